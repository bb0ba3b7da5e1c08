"""LoRA Lab's test kit: what the tests, the benchmarks (bench/) and the demo (scripts/demo.py) share.

    comfy_env     find and set up ComfyUI in-process (the bundled tree or COMFYUI_PATH), import the pack
    checkpoints   tiny SD1.5-architecture checkpoints from ComfyUI's own classes (random weights, cached)
    families      tiny models of the DiT families (SD3, Flux, Wan, HunyuanVideo, Lumina 2, …) and twins
    family_loras  LoRA files as PEFT / LyCORIS / kohya write them for those models, with reference ΔW
    lorafiles     LoRA files of every LyCORIS-family format for the SD layouts
    datasets      captioned image folders in kohya's layout and encoded datasets
    server        a real ComfyUI server in a throw-away base folder, with the pack installed

scripts/bootstrap.sh puts this folder on the venv's path (a .pth file, as an editable install does),
so ``import loralab_testkit`` works from the tests, ``python -m bench`` and the scripts alike.
Nothing here is part of the pack ComfyUI loads.
"""

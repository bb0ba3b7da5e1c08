"""Side-by-side benchmarks of LoRA Lab against ComfyUI core.

Run from the repository root: ``.venv/bin/python -m bench [NAME] [options]`` (``-h`` lists them).
Each benchmark is a module here with ``main(argv) -> int``; the work that is measured runs in
subprocesses (``bench._worker``) so every measurement starts from a fresh process.
Results land in ``bench/results/`` (git-ignored).
"""

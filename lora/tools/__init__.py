"""LoRA tools: rewrite LoRA files (convert, merge, resize), make them (extract) and describe them
(inspect). Core only (plain torch + safetensors, no ComfyUI import); nodes/tools.py and
scripts/loratool.py are thin callers, so the nodes and the command line write the same files.

    from lora.tools import common, convert, extract, inspect, merge, resize

    r = resize.resize("in.safetensors", 16, method="sv_fro", param=0.9)      # -> common.Result
    r = merge.merge([merge.MergeInput("a.safetensors", 0.7), merge.MergeInput("b.safetensors", 0.5)],
                    rank=None)                                               # None: concatenate (exact)
    r = extract.extract(extract.FileWeights("base.safetensors"), extract.FileWeights("tuned.safetensors"), 32)
    r = convert.convert("in.safetensors", key_map, "kohya", model=identity)  # key_map: names -> model keys
    common.save(r, "out.safetensors")                                        # atomic, never overwrites
    common.save_in(r, loras_folder, "LoRA-Lab/merged")                       # -> (path, lora_name)
    print(r.report("out.safetensors"))
    inspect.report(inspect.inspect("in.safetensors"))

Modules: ``svd`` (the weight change as a low-rank product or a dense matrix, its exact thin SVD,
kohya's rank rules), ``delta`` (ΔW of an adapter from its factors alone; which algorithms allow it),
``naming`` (kohya / ComfyUI names picked from a key map), ``common`` (inputs, Result, metadata,
writing), and one module per tool. Each raises ``LoraError`` naming the file and key for bad input,
before anything is written.

Hooks for other work: ``convert.module_targets`` / the ``key_map`` argument is where a newer key map
(e.g. diffusers names of more families) plugs in; ``merge.block_scale`` calls ``lora.blocks.weights_for``
and ``Arch.blocks`` for per-block merge weights once they exist.
"""

"""LoRA Lab core: read, detect, normalise and apply every LoRA-family file. No ComfyUI import.

Typical standalone use::

    from lora import read, parse, match, apply, identify
    f = read("my_lora.safetensors")
    parsed = parse(f.tensors, file=f.name)
    m = match(parsed, key_map, file=f.name, n_file_keys=len(f.tensors))
    print(m.summary(identify(f.tensors, f.metadata)))     # "...: 570 of 570 keys match this model (100%...)"
    handle = apply(model, [(t.key, t.adapter, 0.8) for t in m.targets])
    ...
    handle.restore()
"""
from .adapters import ADAPTERS, Parsed, names as adapter_names, parse, register
from .adapters.base import Adapter
from .arch import ARCHS, Arch, Identity, Variant, identify
from .errors import LoraError
from .io import LoraFile, read, write
from .keys import canonical
from .patch import Match, Patched, Target, apply, match

__all__ = [
    "ADAPTERS", "ARCHS", "Adapter", "Arch", "Identity", "LoraError", "LoraFile", "Match", "Parsed", "Patched",
    "Target", "Variant", "adapter_names", "apply", "canonical", "identify", "match", "parse", "read", "register",
    "write",
]

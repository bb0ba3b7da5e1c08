"""ComfyUI node classes. Each module defines NODES = {node id: (class, display name)}; a module
that fails to import (e.g. an optional dependency missing) is logged and skipped, so one broken
feature never takes the whole pack down. The frontend's HTTP routes (routes.py) are registered on
the running server, when there is one."""
from __future__ import annotations

import importlib
import logging

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in ("loaders", "stack", "dataset", "train", "save", "tools"):
    try:
        _mod = importlib.import_module(f".{_name}", __name__)
    except Exception:
        logging.getLogger("LoRA Lab").exception("LoRA Lab: could not load nodes/%s.py", _name)
        continue
    for _id, (_cls, _display) in _mod.NODES.items():
        assert _id.startswith("LoraLab"), f"node id {_id!r} must start with LoraLab (core ids are dropped)"
        NODE_CLASS_MAPPINGS[_id] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_id] = _display

try:
    from . import routes as _routes
    _routes.register_on_prompt_server()
except Exception:
    logging.getLogger("LoRA Lab").exception("LoRA Lab: could not register the HTTP routes (nodes/routes.py)")

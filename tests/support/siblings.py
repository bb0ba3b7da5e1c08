"""Import a helper module that sits next to a test file (pytest runs with --import-mode=importlib,
so test folders are not on sys.path): ``Rig = sibling(__file__, "test_training_model").Rig``."""
from __future__ import annotations

import importlib.util
import os
import sys


def sibling(test_file: str, name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(test_file), name + ".py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]

"""PyTorch modules of EVF-SAM."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _segment_anything_modeling() -> types.ModuleType:
    """Import `segment_anything.modeling` without running `segment_anything/__init__.py`.

    The package's `__init__` imports its predictor, which imports torchvision (and torchvision pulls
    a CUDA build of torch).  The modeling subpackage itself needs only torch, so the parent package
    is registered bare, as a plain namespace over the same directory, when nothing imported it yet.
    """
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("segment-anything is not installed (pip install segment-anything)")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["segment_anything"] = package
    return importlib.import_module("segment_anything.modeling")


sam_modeling = _segment_anything_modeling()

"""dagfm_ext: fused CPU/CUDA kernels for KD-DAGFM and the distillation pipeline around them."""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (registers the dagfm_ext::* custom ops)
from . import field_mix  # noqa: F401  (the field-mixing op's autograd and fake kernels)
from . import reference
from .functional import dagfm_propagate
from .propagate_sum import dagfm_propagate_with_sum

__version__ = "0.1.0"

# Everything above the op is imported on first use, so a serving process (``dagfm-ext predict``,
# ``dagfm_ext.serving``) loads only torch and the ops, not the training stack (sklearn, tqdm).
_SUBMODULES = ("checkpoint", "config", "data", "distill", "export", "fileio", "kd_model", "metrics",
               "modules", "report", "scorer", "serving", "teachers")
_ATTRS = {"DAGFM": "modules", "DAGFMPlus": "modules", "CrossNet": "teachers", "CIN": "teachers",
          "FM": "teachers", "build_teacher": "teachers", "register_teacher": "teachers",
          "RunConfig": "config", "run_pipeline": "distill"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _ATTRS:
        return getattr(importlib.import_module(f".{_ATTRS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_info() -> dict:
    """What this build of the extension contains: CUDA kernels, architectures, torch, compiler."""
    return dict(_C.build_info())


__all__ = [
    "dagfm_propagate", "dagfm_propagate_with_sum", "field_mix", "reference", "build_info", "__version__",
    "DAGFM", "DAGFMPlus", "CrossNet", "CIN", "FM", "build_teacher", "register_teacher",
    "RunConfig", "run_pipeline", *_SUBMODULES,
]

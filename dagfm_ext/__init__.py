"""dagfm_ext: fused CPU/CUDA kernels for KD-DAGFM and the distillation pipeline around them."""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (registers the dagfm_ext::* custom ops)
from . import reference
from .functional import dagfm_propagate
from .modules import DAGFM, DAGFMPlus
from .teachers import CIN, FM, CrossNet, build_teacher, register_teacher
from . import data, distill, metrics, teachers  # noqa: E402  (after the op: they use it)

__version__ = "0.1.0"


def build_info() -> dict:
    """What this build of the extension contains: CUDA kernels, architectures, torch, compiler."""
    return dict(_C.build_info())


__all__ = [
    "dagfm_propagate", "reference", "build_info", "__version__",
    "DAGFM", "DAGFMPlus", "CrossNet", "CIN", "FM", "build_teacher", "register_teacher",
    "data", "distill", "metrics", "teachers",
]

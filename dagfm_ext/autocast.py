"""How the dagfm_ext forward ops (the propagation and the field mixing) behave inside ``torch.autocast``.

CUDA: float16 / bfloat16 run natively (the CUDA kernels store 16-bit values and accumulate in
float32), so the floating inputs are cast to the region's dtype. CPU: the kernels take float32 and
float64 only, so the inputs are cast to float32 and the outputs stay float32 (the next autocast op
casts them on). Measured with benchmarks/bench_dagfm_plus.py --bf16 (DAGFMPlus forward, B=4096,
F=39, D=16, L=3, a CPU with AVX512-BF16 and AMX): under autocast with this rule against the whole
model in bfloat16 with the einsum propagation, inner and outer are 1.3x and 2.4x faster; kernel is
1.6x slower (its bfloat16 einsum is a oneDNN bfloat16 GEMM), where bfloat16 CPU kernels for the
kernel interaction would pay off.
float64 inputs are left alone, as autocast does for its own ops.

The policy is registered as the ops' Autocast kernels (raw op calls, exported and compiled
graphs) and applied by the public entries before their autograd.Function, so that the backward
sees the same dtypes as the forward.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the op registrations)

__all__ = ["autocast_dtype", "cast_inputs"]

_DEVICE_TYPES = ("cpu", "cuda")


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype the ops run in under the active autocast region of ``device_type``, else None."""
    if device_type not in _DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    if device_type == "cuda":
        return torch.get_autocast_dtype("cuda")
    return torch.float32


def cast_inputs(h0: torch.Tensor, p: torch.Tensor, q: Optional[torch.Tensor]):
    """(h0, p, q) in the dtype the active autocast region asks of the ops (unchanged outside)."""
    if not isinstance(h0, torch.Tensor) or not torch._C._is_any_autocast_enabled():
        return h0, p, q  # (a bad argument: the op names it)
    target = autocast_dtype(h0.device.type)
    if target is None:
        return h0, p, q

    def cast(t):
        if t is None or t.dtype == torch.float64 or not t.is_floating_point():
            return t
        return t.to(target)

    return cast(h0), cast(p), cast(q)


def _cast_propagate_args(h0, p, q, interaction):
    return (*cast_inputs(h0, p, q), interaction)


def _cast_field_mix_args(x, connect):
    return cast_inputs(x, connect, None)[:2]


# The forward ops, each with how its arguments are cast.
_FORWARD_OPS = {"propagate_fwd": _cast_propagate_args, "propagate_fwd_train": _cast_propagate_args,
                "propagate_sum_fwd": _cast_propagate_args, "propagate_sum_fwd_train": _cast_propagate_args,
                "field_mix": _cast_field_mix_args}


def _register(lib: torch.library.Library) -> None:
    for name, cast_args in _FORWARD_OPS.items():
        op = getattr(torch.ops.dagfm_ext, name).default
        for device_type in _DEVICE_TYPES:
            key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            key = getattr(torch._C.DispatchKey, key_name)

            def run(*args, _op=op, _key=key, _cast=cast_args):
                args = _cast(*args)
                with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                    return _op(*args)

            # The Python-dispatcher kernel serves tracing (torch.compile, torch.export); the
            # library kernel serves eager calls. torch.library.register_autocast does the same
            # with a fixed dtype; these ops follow the region's dtype instead.
            op.py_kernels.pop(key, None)
            op.py_impl(key)(run)
            lib.impl(name, lambda _keyset, *args, _run=run: _run(*args), key_name, with_keyset=True)


_LIB = torch.library.Library("dagfm_ext", "IMPL")
_register(_LIB)

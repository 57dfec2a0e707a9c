"""A Triton Inference Server model repository for an exported ONNX student.

Layout (Triton's model repository): ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/1/model.onnx``,
served by the ``onnxruntime_onnx`` platform. The configuration is derived from the ONNX graph: with
``max_batch_size`` > 0 Triton adds the batch axis itself, so ``dims`` list the other axes (-1 where
dynamic); an output that has only the batch axis, such as ``logit`` (batch,), is declared with
``dims: [ 1 ]`` and ``reshape: { shape: [ ] }`` as Triton documents for batch-only tensors, so
clients receive (batch, 1). Dynamic batching merges concurrent requests up to ``max_batch_size``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List


__all__ = ["triton_config", "write_model_repository", "TRITON_DTYPES"]

# ONNX TensorProto element type -> Triton data type.
TRITON_DTYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32",
                 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}


def _dims(value_info) -> List[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


def _tensor(value_info, kind: str) -> str:
    dims = _dims(value_info)
    if not dims or dims[0] != -1:
        raise ValueError(f"model: {kind} {value_info.name!r} has shape {dims}; expected a dynamic batch axis first")
    elem = value_info.type.tensor_type.elem_type
    if elem not in TRITON_DTYPES:
        raise ValueError(f"model: {kind} {value_info.name!r} has an ONNX element type ({elem}) Triton does not serve")
    lines = [f'    name: "{value_info.name}"', f"    data_type: {TRITON_DTYPES[elem]}"]
    if len(dims) == 1:  # batch only: one element per row, reshaped away for the model
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    else:
        lines.append(f"    dims: [ {', '.join(str(d) for d in dims[1:])} ]")
    return "  {\n" + "\n".join(lines) + "\n  }"


def triton_config(model, name: str, max_batch_size: int = 1024, max_queue_delay_us: int = 100) -> str:
    """The ``config.pbtxt`` text for an ``onnx.ModelProto`` whose inputs and outputs are batch-first."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size: expected a positive int, got {max_batch_size!r}")
    inputs = ",\n".join(_tensor(v, "input") for v in model.graph.input)
    outputs = ",\n".join(_tensor(v, "output") for v in model.graph.output)
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n")


def write_model_repository(model, repository, name: str, version: int = 1, max_batch_size: int = 1024) -> Path:
    """Write ``repository/name/config.pbtxt`` and ``repository/name/<version>/model.onnx``; returns
    the model's directory."""
    from .fileio import atomic_write, atomic_write_text, make_dirs
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise ValueError(f"name: expected a Triton model name (letters, digits, '_', '.', '-'), got {name!r}")
    config = triton_config(model, name, max_batch_size)
    root = Path(repository) / name
    make_dirs(root / str(version))
    atomic_write(root / str(version) / "model.onnx", lambda f: f.write(model.SerializeToString()))
    atomic_write_text(root / "config.pbtxt", config)
    return root

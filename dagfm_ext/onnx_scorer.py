"""Scoring encoded rows with an exported ONNX student through onnxruntime.

This module itself uses onnxruntime, numpy and json only, and the graph needs no part of this
package: a process without torch or dagfm_ext (importing ``dagfm_ext`` loads torch) serves the same
file with a plain ``onnxruntime.InferenceSession`` (input ``slots``, outputs ``logit`` and
``probability``), as does Triton's onnxruntime backend. The schema is in the model's metadata:
``dagfm_ext.schema`` holds ``FeatureSchema.to_dict()`` as JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["OnnxStudent", "require"]

# The file's contract: one int64 input of encoded rows, these outputs, this metadata.
INPUT_NAME = "slots"
OUTPUT_NAMES = ("logit", "probability")
SCHEMA_KEY = "dagfm_ext.schema"
META_KEY = "dagfm_ext.meta"


def require(module: str):
    """Import an optional dependency of the ONNX path, or say how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(f"the ONNX export and scoring need the {module!r} package: "
                           "pip install 'dagfm_ext[onnx]'") from None


class OnnxStudent:
    """``OnnxStudent(path)(slots (B, num_slots) int64) -> logits (B,) float32``.

    ``schema`` is the feature schema as a dict (``FeatureSchema.from_dict`` rebuilds it), ``meta``
    the export's metadata; ``threads`` sets onnxruntime's intra-op threads (default: its own)."""

    def __init__(self, path, threads: Optional[int] = None):
        ort = require("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model: no such file: {path}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (any unreadable file is reported the same way)
            raise ValueError(f"model: {path} is not an ONNX model onnxruntime can load "
                             f"({type(e).__name__}: {e})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if SCHEMA_KEY not in props:
            raise ValueError(f"model: {path} has no '{SCHEMA_KEY}' metadata; write it with 'dagfm-ext export --onnx'")
        self.schema = json.loads(props[SCHEMA_KEY])
        self.meta = json.loads(props.get(META_KEY, "{}"))
        self.input_name = self.session.get_inputs()[0].name
        self.num_slots = int(self.session.get_inputs()[0].shape[1])

    def __call__(self, slots) -> np.ndarray:
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        if slots.ndim != 2 or slots.shape[1] != self.num_slots:
            raise ValueError(f"slots: expected encoded rows (B, {self.num_slots}), got {slots.shape}")
        return self.session.run([OUTPUT_NAMES[0]], {self.input_name: slots})[0]

"""Exporting a finished run: its finetuned student as a ``serving`` program or an ONNX model.

This is the training side of export (it reads a run checkpoint and rebuilds the model classes);
``serving`` itself loads and runs exported programs without any of that code.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .checkpoint import load_finished_run
from .data import FeatureSchema
from .serving import export_student

__all__ = ["export_checkpoint", "export_onnx_checkpoint", "student_from_checkpoint"]


def student_from_checkpoint(checkpoint) -> Tuple[nn.Module, nn.Module, FeatureSchema, dict]:
    """(embedding, student, schema, metadata) of a finished run (a run directory or its
    checkpoint.pt), on CPU."""
    cfg, schema, model = load_finished_run(checkpoint)
    meta = {"student": cfg.student, "interaction": cfg.interaction, "depth": cfg.depth,
            "embed_dim": cfg.embed_dim, "dataset": cfg.dataset}
    return model.embedding, model.student, schema, meta


def export_checkpoint(checkpoint, output, aoti_output=None) -> torch.export.ExportedProgram:
    """Export the finetuned student of a finished run as a torch.export program (``serving``)."""
    embedding, student, schema, meta = student_from_checkpoint(checkpoint)
    return export_student(embedding, student, schema, output, aoti_output, meta=meta)


def export_onnx_checkpoint(checkpoint, output, triton_dir=None, model_name: Optional[str] = None):
    """Export the finetuned student of a finished run as a standard-op ONNX model (``onnx_export``),
    and with ``triton_dir`` a Triton model repository around it."""
    from .onnx_export import export_onnx  # needs the optional onnx package
    embedding, student, schema, meta = student_from_checkpoint(checkpoint)
    return export_onnx(embedding, student, schema, output, triton_dir, model_name, meta)

"""Exporting a finished run: its finetuned student as a ``serving`` program.

This is the training side of export (it reads a run checkpoint and rebuilds the model classes);
``serving`` itself loads and runs exported programs without any of that code.
"""
from __future__ import annotations

import torch

from .checkpoint import load_finished_run
from .serving import export_student

__all__ = ["export_checkpoint"]


def export_checkpoint(checkpoint, output, aoti_output=None) -> torch.export.ExportedProgram:
    """Export the finetuned student of a finished run (a run directory or its checkpoint.pt)."""
    cfg, schema, model = load_finished_run(checkpoint)
    meta = {"student": cfg.student, "interaction": cfg.interaction, "depth": cfg.depth,
            "embed_dim": cfg.embed_dim, "dataset": cfg.dataset}
    return export_student(model.embedding, model.student, schema, output, aoti_output, meta=meta)

"""The model a distillation run trains: one embedding table shared by a teacher and a student,
built from a ``RunConfig`` and the data's schema."""
from __future__ import annotations

from torch import nn

from .config import RunConfig
from .data import FeatureSchema, FieldEmbedding
from .modules import DAGFM, DAGFMPlus
from .teachers import FM, build_teacher

__all__ = ["KDModel", "build_student", "build_model"]


class KDModel(nn.Module):
    """The shared embedding table with the teacher and the student on top of it."""

    def __init__(self, embedding: FieldEmbedding, teacher: nn.Module, student: nn.Module):
        super().__init__()
        self.embedding, self.teacher, self.student = embedding, teacher, student


def build_student(cfg: RunConfig, num_fields: int) -> nn.Module:
    if cfg.student == "dagfm":
        return DAGFM(num_fields, cfg.embed_dim, cfg.depth, cfg.interaction)
    if cfg.student == "dagfm+":
        return DAGFMPlus(num_fields, cfg.embed_dim, cfg.depth, cfg.interaction, mlp=cfg.mlp)
    return FM(num_fields, cfg.embed_dim)


def build_model(cfg: RunConfig, schema: FeatureSchema) -> KDModel:
    F = schema.num_fields
    teacher = build_teacher(cfg.teacher, F, cfg.embed_dim, depth=cfg.teacher_depth,
                            cin_layers=cfg.cin_layers)
    return KDModel(FieldEmbedding(schema, cfg.embed_dim), teacher, build_student(cfg, F))

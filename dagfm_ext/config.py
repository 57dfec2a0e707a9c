"""What a distillation run is asked to do: ``RunConfig``, the phase names and the student names.

Plain data and its validation (which needs only the interaction names and the teacher registry),
so the CLI builds its parser from the defaults and a checkpoint's config is read back without
loading the pipeline.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Optional, Tuple

import torch

from .data.names import FILE_KINDS
from .precision import check_precision
from .reference import INTERACTIONS
from .teachers import teacher_names

__all__ = ["RunConfig", "PHASES", "STUDENTS"]

PHASES = ("teacher", "distill", "finetune")
# What a resumed run may change: where it executes and how it reports, not what it trains.
RESUMABLE = ("device", "progress", "output", "cache_dir", "stop_after", "eval_batch_size")
STUDENTS = ("dagfm", "dagfm+", "fm")


@dataclass
class RunConfig:
    dataset: str = "ml-100k"
    teacher: str = "crossnet"
    student: str = "dagfm"
    interaction: str = "inner"
    depth: int = 3
    teacher_depth: int = 3
    cin_layers: Tuple[int, ...] = (128, 128)
    mlp: Tuple[int, ...] = (256, 128)
    embed_dim: int = 16
    batch_size: int = 1024
    eval_batch_size: int = 8192
    lr: float = 3e-3
    weight_decay: float = 1e-6
    alpha: float = 0.1
    beta: float = 921.6
    max_epochs: int = 20
    patience: int = 3
    seed: int = 2022
    device: str = "cpu"
    min_count: int = 10
    synthetic_size: int = 20000
    cache_dir: str = ""  # preprocessed data; "" = the per-user default
    output: str = "runs/dagfm"
    progress: bool = True
    precision: str = "fp32"  # dagfm_ext.precision.PRECISIONS
    stop_after: str = "finetune"  # last phase to run; the report needs all three

    def validate(self) -> "RunConfig":
        if self.student not in STUDENTS:
            raise ValueError(f"student: expected one of {STUDENTS}, got {self.student!r}")
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction: expected one of {INTERACTIONS}, got {self.interaction!r}")
        if self.teacher not in teacher_names():
            raise ValueError(f"teacher: unknown name {self.teacher!r}; expected one of {teacher_names()}")
        for name in ("depth", "teacher_depth", "embed_dim", "batch_size", "eval_batch_size",
                     "max_epochs", "patience", "min_count", "synthetic_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("lr", "alpha", "beta", "weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', "
                             f"got {self.device!r}") from None
        dev = torch.device(self.device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} requested but CUDA is not available")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {self.device!r} requested but only {torch.cuda.device_count()} GPUs are visible")
        kind, _, path = self.dataset.partition(":")
        if kind in FILE_KINDS and path:  # absolute, so a resumed run finds it from anywhere
            self.dataset = f"{kind}:{os.path.abspath(path)}"
        if self.stop_after not in PHASES:
            raise ValueError(f"stop_after: expected one of {PHASES}, got {self.stop_after!r}")
        check_precision(self.precision, self.device)
        self.cin_layers, self.mlp = tuple(self.cin_layers), tuple(self.mlp)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def continued_by(self, cfg: "RunConfig", given: Optional[Iterable[str]] = None) -> "RunConfig":
        """This (saved) run's config as ``cfg`` resumes it. Only where the run executes and how it
        reports may change (``RESUMABLE``); a setting named in ``given`` (every setting when None)
        that differs from the saved one is a ValueError listing them all."""
        saved = RunConfig.from_dict(self.to_dict())
        for n in RESUMABLE:
            setattr(saved, n, getattr(cfg, n))
        saved, cfg = saved.validate(), cfg.validate()
        names = [f.name for f in fields(self) if f.name not in RESUMABLE and (given is None or f.name in given)]
        differ = [f"{n} {getattr(saved, n)!r} (given {getattr(cfg, n)!r})" for n in names
                  if getattr(saved, n) != getattr(cfg, n)]
        if differ:
            raise ValueError(f"resume: the run in {cfg.output} was started with other settings: {'; '.join(differ)}. "
                             "Resume with its settings, or start a new run in another --output")
        return saved

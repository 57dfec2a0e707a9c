"""A run's checkpoint: everything needed to continue a run, or to export its student.

``DIR/checkpoint.pt`` holds the config, the data schema (vocabularies), the model, the optimizer,
the RNG states and the ``Progress`` (phase, epoch, early-stopping counters, epoch log, phase
summaries). It is written atomically after every epoch and at every phase end, so a killed run
resumes from its last finished epoch (docs/layout.md describes the run directory).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .config import PHASES, RunConfig
from .data import FeatureSchema
from .fileio import atomic_torch_save
from .kd_model import KDModel, build_model

__all__ = ["CHECKPOINT", "Progress", "seed_all", "capture_rng", "restore_rng", "checkpoint_state",
           "write_checkpoint", "read_checkpoint", "checkpoint_file", "load_finished_run"]

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


@dataclass
class Progress:
    """Where a run stands: the phase, the epoch within it, early stopping and the results so far."""
    phase_idx: int = 0
    epoch: int = 0               # finished epochs of the current phase
    bad_epochs: int = 0          # epochs since the best validation AUC
    best_auc: float = -math.inf
    best_epoch: int = 0
    best_state: Optional[dict] = None  # the phase's weights at its best epoch
    history: list = field(default_factory=list)    # one row per finished epoch, every phase
    summaries: list = field(default_factory=list)  # one row per finished phase
    teacher_test_logits: Optional[np.ndarray] = None

    def record(self, val_auc: float, best_state) -> bool:
        """Count a finished epoch; ``best_state()`` is kept when it is the best so far."""
        self.epoch += 1
        if val_auc > self.best_auc:
            self.best_auc, self.best_epoch, self.bad_epochs = val_auc, self.epoch, 0
            self.best_state = best_state()
            return True
        self.bad_epochs += 1
        return False

    def next_phase(self) -> None:
        self.phase_idx += 1
        self.epoch, self.bad_epochs, self.best_auc, self.best_epoch, self.best_state = 0, 0, -math.inf, 0, None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # no deep copy of the tensors

    @classmethod
    def from_dict(cls, d: dict) -> "Progress":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def checkpoint_state(cfg: RunConfig, schema: FeatureSchema, model: torch.nn.Module,
                     optimizer: Optional[torch.optim.Optimizer], progress: Progress) -> dict:
    """The dict saved as ``checkpoint.pt`` (progress fields at the top level)."""
    return {"format": FORMAT, "config": cfg.to_dict(), "schema": schema.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            **progress.to_dict(), "rng": capture_rng()}


def write_checkpoint(out_dir: Path, state: dict) -> None:
    atomic_torch_save(state, Path(out_dir) / CHECKPOINT)


def read_checkpoint(file: Path) -> dict:
    return torch.load(file, map_location="cpu", weights_only=False)


def checkpoint_file(path) -> Path:
    """The checkpoint of a run directory, or the file itself."""
    path = Path(path)
    file = path / CHECKPOINT if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint: expected a run directory holding {CHECKPOINT} or the "
                                f"file itself, got {str(path)!r}")
    return file


def load_finished_run(checkpoint) -> Tuple[RunConfig, FeatureSchema, KDModel]:
    """The config, schema and trained model (on CPU) of a run that finished all its phases."""
    file = checkpoint_file(checkpoint)
    state = read_checkpoint(file)
    if not isinstance(state, dict) or "model" not in state or "schema" not in state:
        raise ValueError(f"checkpoint: {file} is not a dagfm_ext run checkpoint")
    if state["phase_idx"] < len(PHASES):
        raise ValueError(f"checkpoint: the run in {file.parent} has not finished (in phase "
                         f"{PHASES[state['phase_idx']]!r}, epoch {state['epoch']}); finish it with "
                         "'dagfm-ext run --output DIR --resume' first")
    cfg = RunConfig.from_dict(state["config"])
    cfg.device = "cpu"
    schema = FeatureSchema.from_dict(state["schema"])
    model = build_model(cfg, schema)
    model.load_state_dict(state["model"])
    return cfg, schema, model

"""A run's checkpoint: everything needed to continue a run, or to export its student.

``DIR/checkpoint.pt`` holds the config, the data schema (vocabularies), the model, the optimizer,
the RNG states, the loss scaler (``scaler``: None unless training in fp16) and the ``Progress``
(phase, epoch, early-stopping counters, epoch log, phase summaries). It is written atomically
after every epoch and at every phase end, so a killed run resumes from its last finished epoch
(docs/layout.md describes the run directory).

The file holds tensors and plain data only (RNG states included), so it is read with torch's
weights-only unpickler: loading a checkpoint never runs code. A sha256 ``digest`` of everything
else in it is checked on load, so a changed byte is an error, not a different model. The earlier
format (pickled numpy objects) is read only by ``convert_checkpoint``, on the user's word that
the file is trusted.
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
from .safe_load import UnsafeFileError, digest, load_failure, load_plain

__all__ = ["CHECKPOINT", "Progress", "seed_all", "capture_rng", "restore_rng", "checkpoint_state",
           "write_checkpoint", "read_checkpoint", "checkpoint_file", "load_finished_run",
           "convert_checkpoint"]

CHECKPOINT = "checkpoint.pt"
FORMAT = 2  # 1: pickled numpy RNG state and arrays (read only by convert_checkpoint)


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


_KEYS = {"format", "config", "schema", "model", "optimizer", "rng", "digest", *(f.name for f in fields(Progress))}
# Keys a checkpoint of the same format may lack (written before they existed): their value then.
_OPTIONAL = {"scaler": None}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """The RNG states as tensors and plain data (what the weights-only unpickler reads)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": [version, list(py_state), py_gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, py_state, py_gauss = rng["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def checkpoint_state(cfg: RunConfig, schema: FeatureSchema, model: torch.nn.Module,
                     optimizer: Optional[torch.optim.Optimizer], progress: Progress,
                     scaler: Optional[torch.amp.GradScaler] = None) -> dict:
    """The dict saved as ``checkpoint.pt`` (progress fields at the top level): tensors and plain
    data only, plus the ``digest`` of all of it."""
    prog = progress.to_dict()
    if prog["teacher_test_logits"] is not None:
        prog["teacher_test_logits"] = torch.from_numpy(np.asarray(prog["teacher_test_logits"]))
    state = {"format": FORMAT, "config": cfg.to_dict(), "schema": schema.to_dict(),
             "model": model.state_dict(),
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
             **prog, "rng": capture_rng()}
    state["digest"] = digest(state)
    return state


def write_checkpoint(out_dir: Path, state: dict) -> None:
    write_checkpoint_file(Path(out_dir) / CHECKPOINT, state)


def write_checkpoint_file(file: Path, state: dict) -> None:
    atomic_torch_save(state, file)


_CONVERT = "dagfm-ext convert-checkpoint --trust-pickle {file} NEW"


def read_checkpoint(file: Path) -> dict:
    """A checkpoint read without unpickling anything but tensors and plain data, its structure
    and digest checked; every refusal is a ValueError naming the file."""
    try:
        state = load_plain(file, "checkpoint")
    except UnsafeFileError as e:
        raise UnsafeFileError(f"{e}. If it is a checkpoint of an older dagfm-ext from a source you trust, "
                              f"convert it: {_CONVERT.format(file=file)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("format"), int):
        raise ValueError(f"checkpoint: {file} is not a dagfm_ext run checkpoint")
    if state["format"] != FORMAT:
        raise ValueError(f"checkpoint: {file} has format {state['format']}, this dagfm_ext reads format "
                         f"{FORMAT}" + (f"; if you trust its source, convert it: {_CONVERT.format(file=file)}"
                                        if state["format"] < FORMAT else ""))
    missing = sorted(_KEYS - set(state))
    if missing:
        raise ValueError(f"checkpoint: {file} lacks {', '.join(missing)}; it was not written by dagfm_ext")
    saved = state.pop("digest")
    try:
        actual = digest(state)
    except TypeError as e:
        raise ValueError(f"checkpoint: {file} holds data a checkpoint never holds ({e})") from None
    if saved != actual:
        raise ValueError(f"checkpoint: {file} is damaged: its contents do not match their sha256 digest")
    for key, default in _OPTIONAL.items():
        state.setdefault(key, default)
    if not (isinstance(state["config"], dict) and isinstance(state["schema"], dict)
            and isinstance(state["model"], dict) and isinstance(state["rng"], dict)
            and (state["scaler"] is None or isinstance(state["scaler"], dict))):
        raise ValueError(f"checkpoint: {file} is not a dagfm_ext run checkpoint")
    if state["teacher_test_logits"] is not None:
        state["teacher_test_logits"] = state["teacher_test_logits"].numpy()
    return state


def convert_checkpoint(old, new, trust_pickle: bool = False) -> Path:
    """Rewrite a checkpoint of the earlier pickled format (numpy RNG state and arrays) in the
    present one. Unpickling ``old`` can run any code it holds: only with ``trust_pickle``, for
    files from a source you trust."""
    file = checkpoint_file(old)
    if not trust_pickle:
        raise ValueError("convert-checkpoint: reading the old format unpickles arbitrary objects, which can run "
                         f"code; pass --trust-pickle if you trust the source of {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
        rng = state["rng"]
        _, key, pos, has_gauss, gauss = rng["numpy"]
        version, py_state, py_gauss = rng["python"]
        state["rng"] = {"torch": rng["torch"], "numpy": {"key": torch.from_numpy(np.asarray(key, np.int64)),
                                                         "pos": int(pos), "has_gauss": int(has_gauss),
                                                         "gauss": float(gauss)},
                        "python": [version, list(py_state), py_gauss], "cuda": rng["cuda"]}
        if state.get("teacher_test_logits") is not None:
            state["teacher_test_logits"] = torch.from_numpy(np.asarray(state["teacher_test_logits"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"convert-checkpoint: {file} is not a checkpoint of an older dagfm_ext ({e})") from None
    except Exception as e:  # noqa: BLE001  (torch.load of arbitrary bytes fails in many ways)
        raise ValueError(f"convert-checkpoint: {file} is not a readable torch file ({load_failure(e)})") from None
    state.pop("digest", None)
    state["format"] = FORMAT
    state["digest"] = digest(state)
    new = Path(new)
    new = new / CHECKPOINT if new.is_dir() else new
    write_checkpoint_file(new, state)
    return new


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

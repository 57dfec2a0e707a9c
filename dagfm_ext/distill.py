"""The KD-DAGFM three-phase pipeline: teacher training, distillation, finetuning.

One embedding table is shared by teacher and student.
  1. ``teacher``:  teacher + embeddings on BCE.
  2. ``distill``:  embeddings frozen, teacher in eval mode under no_grad; the student is trained
                   on ``alpha * BCE(student, y) + beta * MSE(teacher_logit, student_logit)``.
  3. ``finetune``: student + embeddings on BCE.
Each phase early-stops on validation AUC (``patience`` epochs without improvement), restores its
best epoch and scores the test split once.

After every epoch and at every phase end the run is saved to ``DIR/checkpoint.pt``
(``checkpoint``). ``resume=True`` continues right after the last finished epoch; batches are
shuffled by an RNG keyed on (seed, phase, epoch), so a resumed run sees exactly the batches an
uninterrupted one would.

Under torchrun (``dagfm_ext.distributed``) every rank trains a DistributedDataParallel replica on
its round-robin share of each global batch; the loss is scaled so the averaged gradient is the
global-batch mean, validation/test predictions are gathered from all ranks before scoring, and
rank 0 alone writes the checkpoint, logs and report (every rank reads the checkpoint on resume).
docs/layout.md follows a run from the CLI through this loop down to the fused op.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed, metrics
from .checkpoint import (CHECKPOINT, Progress, checkpoint_state, read_checkpoint, restore_rng, seed_all,
                         write_checkpoint)
from .config import PHASES, RunConfig
from .data import FeatureSchema, Prefetcher, TabularData, load_dataset
from .fileio import atomic_write_text, make_dirs
from .kd_model import build_model
from .precision import Precision
from .report import build_report, epoch_line, write_logs
from .scorer import Scorer

__all__ = ["Pipeline", "run_pipeline", "RunConfig"]

# What each phase trains and keeps at its best epoch.
_PHASE_PARTS = {"teacher": ("embedding", "teacher"), "distill": ("student",), "finetune": ("embedding", "student")}


class Pipeline:
    """Runs (or resumes) the three phases for one ``RunConfig``; ``run()`` returns the report."""

    def __init__(self, cfg: RunConfig, resume: bool = False, data: Optional[TabularData] = None,
                 given: Optional[Iterable[str]] = None):
        """``resume`` continues the run in ``cfg.output``; the settings named in ``given`` (all of
        ``cfg`` when None) must then be those the run was started with (``RunConfig.continued_by``)."""
        self.ctx = distributed.context()
        self.out = Path(cfg.output)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"output: {self.out} is a file; expected a run directory")
        if resume and not (self.out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"resume: {self.out} holds no run to resume (no {CHECKPOINT}); "
                                    "leave out --resume to start one")
        make_dirs(self.out)
        saved = self._saved_run(resume)
        if saved is not None:
            cfg = RunConfig.from_dict(saved["config"]).continued_by(cfg, given)
        self.cfg = cfg.validate()
        self.device = torch.device(cfg.device)
        self.precision = Precision(cfg.precision, self.device)
        if saved is None:
            seed_all(cfg.seed)
        self.data = data if data is not None else self._load_data()
        self._check_splits()
        if saved is not None:
            self._use_saved_schema(saved["schema"])
        self.model = build_model(cfg, self.data.schema).to(self.device)
        self.progress = Progress()
        self.optimizer = self._make_optimizer()
        self._ddp: Optional[Tuple[int, nn.Module]] = None
        if saved is not None:
            self._restore(saved)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> Optional[dict]:
        """Run the remaining phases; returns the report (None if stopped before finetuning, and
        on every rank but 0)."""
        last = PHASES.index(self.cfg.stop_after)
        while self.progress.phase_idx <= last:
            self._run_phase()
        if self.progress.phase_idx < len(PHASES):
            return None
        report = None
        if self.ctx.is_main:
            report = self.report()
            atomic_write_text(self.out / "report.json", json.dumps(report, indent=2))
        self.ctx.barrier()  # when run() returns on any rank, report.json is on disk
        return report

    def _run_phase(self) -> None:
        p, cfg = self.progress, self.cfg
        while p.epoch < cfg.max_epochs and p.bad_epochs < cfg.patience:
            self._run_epoch()
        self._finish_phase()

    def _run_epoch(self) -> None:
        t0 = time.perf_counter()
        train_loss = self._train_epoch()
        val = self._validate()
        best = self.progress.record(val["auc"], self._phase_state)
        row = {"phase": self.phase, "epoch": self.progress.epoch, "train_loss": train_loss,
               "val_auc": val["auc"], "val_gauc": val.get("gauc"), "val_logloss": val["logloss"], "val_logit_mse": val["logit_mse"],
               "best": best, "seconds": round(time.perf_counter() - t0, 3)}
        self.progress.history.append(row)
        self._say(epoch_line(row))
        self.save_checkpoint()

    def _finish_phase(self) -> None:
        """Restore the phase's best epoch, score the test split, move on to the next phase."""
        p = self.progress
        if p.best_state is not None:
            self.model.load_state_dict(p.best_state, strict=False)
        logits, y = self._logits("test", self._phase_module())
        test = metrics.evaluate_logits(y, logits, self.data.users("test"))
        summary = {"phase": self.phase, "epochs": p.epoch, "best_epoch": p.best_epoch,
                   "best_val_auc": p.best_auc if math.isfinite(p.best_auc) else None,
                   "test_auc": test["auc"], "test_logloss": test["logloss"], "test_gauc": test.get("gauc")}
        if self.phase == "teacher":
            p.teacher_test_logits = logits
        elif p.teacher_test_logits is not None:
            summary["test_logit_mse"] = float(np.mean((logits - p.teacher_test_logits) ** 2))
        p.summaries.append(summary)
        self._say(f"[{self.phase}] best epoch {p.best_epoch}: test AUC {test['auc']:.4f}  "
                  f"LogLoss {test['logloss']:.4f}")
        p.next_phase()
        self.optimizer = self._make_optimizer()
        self.save_checkpoint()

    def report(self) -> dict:
        x = next(self.data.batches("test", self.cfg.batch_size))[0].to(self.device)
        return build_report(self.model, self.cfg, self.progress.summaries, x, self.data.schema.num_fields)

    # -- what the current phase trains -------------------------------------------------------
    @property
    def phase(self) -> str:
        return PHASES[self.progress.phase_idx]

    @property
    def history(self) -> list:
        return self.progress.history

    @property
    def summaries(self) -> list:
        return self.progress.summaries

    def _phase_module(self) -> nn.Module:
        return self.model.teacher if self.phase == "teacher" else self.model.student

    def _make_optimizer(self) -> Optional[torch.optim.Optimizer]:
        if self.progress.phase_idx >= len(PHASES):
            return None
        params = [p for part in _PHASE_PARTS[self.phase] for p in getattr(self.model, part).parameters()]
        return torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _phase_state(self) -> dict:
        keep = tuple(part + "." for part in _PHASE_PARTS[self.phase])
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if k.startswith(keep)}

    # -- training and evaluation --------------------------------------------------------------
    def _trainer(self) -> nn.Module:
        """What a training step calls: encoded rows -> logits (embeddings + network), or in
        distillation embeddings -> student logits; wrapped in DDP when there are several ranks."""
        m = self.model
        net = m.student if self.phase == "distill" else Scorer(m.embedding, self._phase_module())
        if not self.ctx.distributed:
            return net
        if self._ddp is None or self._ddp[0] != self.progress.phase_idx:
            # One wrapper per phase: DDP registers the parameters that require grad at construction.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = (self.progress.phase_idx, DistributedDataParallel(net, device_ids=ids))
        return self._ddp[1]

    def _train_epoch(self) -> float:
        cfg, ctx = self.cfg, self.ctx
        net = self._trainer()
        self.model.train()
        self.model.teacher.train(self.phase == "teacher")  # the teacher is only a target in phase 2
        rng = np.random.default_rng([cfg.seed, self.progress.phase_idx, self.progress.epoch])
        total, n, size = 0.0, 0, self.data.size("train")
        batches = self.data.batches("train", cfg.batch_size, shuffle=True, rng=rng, rank=ctx.rank,
                                    world_size=ctx.world_size)
        if self.device.type == "cuda":  # assemble the next batches in pinned memory during the step
            batches = Prefetcher(batches, pin=True)
        bar = tqdm(batches, total=math.ceil(size / cfg.batch_size), leave=False,
                   desc=f"{self.phase} {self.progress.epoch + 1}/{cfg.max_epochs}",
                   disable=not (cfg.progress and ctx.is_main), file=sys.stderr, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            rows = min(cfg.batch_size, size - step * cfg.batch_size)
            loss = self._loss(net, x, y, rows)
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.backward_step(loss * ctx.world_size, self.optimizer)
            total += loss.item() * rows  # this rank's share of the batch's summed loss
            n += len(y)
            bar.set_postfix(loss=f"{total / max(n, 1):.4f}", refresh=False)
        bar.close()
        total, n = ctx.sum([total, n], self.device)
        return total / max(n, 1)

    def _loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int) -> torch.Tensor:
        """The phase's loss on this rank's share of a global batch of ``rows`` rows.

        Means are over the *global* batch: DDP averages gradients over the ranks, so each rank's
        sum is divided by the global row count (and the caller multiplies by the world size).
        Then W ranks step exactly as one process does on the whole batch, even when shares differ
        by a row."""
        bce = nn.functional.binary_cross_entropy_with_logits
        mean = lambda t: t.sum() / rows  # noqa: E731
        with self.precision.forward():
            if self.phase != "distill":
                return mean(bce(net(x), y, reduction="none"))
            with torch.no_grad():
                emb = self.model.embedding(x)
                t_logit = self.model.teacher(emb).float()
            s_logit = net(emb).float()  # the logit MSE in float32
        return self.cfg.alpha * mean(bce(s_logit, y, reduction="none")) + self.cfg.beta * mean((t_logit - s_logit) ** 2)

    def _validate(self) -> dict:
        """Validation AUC and LogLoss of the phase's network; in distillation also its logit MSE
        to the teacher."""
        logits, y = self._logits("val", self._phase_module())
        val = dict(metrics.evaluate_logits(y, logits, self.data.users("val")), logit_mse=None)
        if self.phase == "distill":
            t_logits, _ = self._logits("val", self.model.teacher)
            val["logit_mse"] = float(np.mean((t_logits - logits) ** 2))
        return val

    def _logits(self, split: str, network: nn.Module) -> Tuple[np.ndarray, np.ndarray]:
        """Logits and labels of a whole split in split order (gathered from every rank)."""
        self.model.eval()
        ctx, bs, n = self.ctx, self.cfg.eval_batch_size, self.data.size(split)
        out = []
        with torch.no_grad():
            for k, (x, _) in enumerate(self.data.batches(split, bs, rank=ctx.rank, world_size=ctx.world_size)):
                with self.precision.forward():
                    local = network(self.model.embedding(x.to(self.device))).float()
                out.append(ctx.gather_batch(local, min(bs, n - k * bs)).cpu().numpy())
        return np.concatenate(out), np.asarray(self.data.y[self.data.splits[split]], dtype=np.float32)

    # -- saving and resuming ------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            write_checkpoint(self.out, checkpoint_state(self.cfg, self.data.schema, self.model,
                                                        self.optimizer, self.progress, self.precision.scaler))
            write_logs(self.out, self.progress.history)
        # No rank starts the next epoch before this checkpoint is on disk: a rank killed there
        # resumes from this epoch, not an older one.
        self.ctx.barrier()

    def _saved_run(self, resume: bool) -> Optional[dict]:
        """The checkpoint already in the output directory (only with ``resume``), else None."""
        path = self.out / CHECKPOINT
        if not path.exists():
            return None
        if not resume:
            raise FileExistsError(f"output: {self.out} already holds a run ({CHECKPOINT}); "
                                  "pass --resume to continue it or choose another --output")
        return read_checkpoint(path)

    def _load_data(self) -> TabularData:
        # Rank 0 first: it fills the download and preprocessing caches the others then read.
        cfg, ctx = self.cfg, self.ctx
        if not ctx.is_main:
            ctx.barrier()
        data = load_dataset(cfg.dataset, seed=cfg.seed, min_count=cfg.min_count, cache_dir=cfg.cache_dir or None,
                            synthetic_size=cfg.synthetic_size, progress=cfg.progress and ctx.is_main)
        if ctx.is_main:
            ctx.barrier()
        return data

    def _check_splits(self) -> None:
        """Every split must have rows of both classes: AUC, which each phase selects its best epoch
        by and the report compares, is undefined otherwise."""
        data = self.data
        for split in ("train", "val", "test"):
            y = np.asarray(data.y[data.splits[split]])
            what = (f"dataset: the {split} split of {self.cfg.dataset!r} ({len(data.y)} rows, "
                    f"{len(y)} in {split})")
            metrics.require_both_classes(y, what)

    def _use_saved_schema(self, schema: dict) -> None:
        # The vocabularies must be those the saved weights were trained with.
        if schema != self.data.schema.to_dict():
            raise RuntimeError(f"resume: the dataset {self.cfg.dataset!r} no longer encodes as the "
                               f"checkpoint in {self.out} expects (vocabularies differ)")
        self.data.schema = FeatureSchema.from_dict(schema)

    def _restore(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.progress = Progress.from_dict(saved)
        self.optimizer = self._make_optimizer()
        if self.optimizer is not None and saved["optimizer"] is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
        if saved["scaler"] is not None:
            self.precision.scaler.load_state_dict(saved["scaler"])
        restore_rng(saved["rng"])

    def _say(self, msg: str) -> None:
        if self.cfg.progress and self.ctx.is_main:
            tqdm.write(msg, file=sys.stderr)


def run_pipeline(cfg: RunConfig, resume: bool = False, data: Optional[TabularData] = None) -> Optional[dict]:
    return Pipeline(cfg, resume=resume, data=data).run()

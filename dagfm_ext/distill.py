"""The KD-DAGFM three-phase pipeline: teacher training, distillation, finetuning.

One embedding table is shared by teacher and student.
  1. ``teacher``:  teacher + embeddings on BCE.
  2. ``distill``:  embeddings frozen, teacher in eval mode under no_grad; the student is trained
                   on ``alpha * BCE(student, y) + beta * MSE(teacher_logit, student_logit)``.
  3. ``finetune``: student + embeddings on BCE.
Each phase early-stops on validation AUC (``patience`` epochs without improvement), restores its
best epoch and scores the test split once.

Everything a run needs to continue lives in ``DIR/checkpoint.pt``, written atomically (temp
file + ``os.replace``) after every epoch and at every phase end: model, best-so-far state,
optimizer, RNG states, counters, the epoch log. ``resume=True`` continues right after the last
finished epoch; batches are shuffled by an RNG keyed on (seed, phase, epoch), so a resumed run
sees exactly the batches an uninterrupted one would.

Under torchrun (``dagfm_ext.distributed``) every rank trains a DistributedDataParallel replica on
its round-robin share of each global batch; the loss is scaled so the averaged gradient is the
global-batch mean, validation/test predictions are gathered from all ranks before scoring, and
rank 0 alone writes the checkpoint, logs and report (every rank reads the checkpoint on resume).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed, metrics
from .data import FeatureSchema, FieldEmbedding, TabularData, load_dataset
from .modules import DAGFM, DAGFMPlus, INTERACTIONS
from .precision import Precision, check_precision
from .serving import Scorer
from .teachers import FM, build_teacher, teacher_names

__all__ = ["RunConfig", "KDModel", "Pipeline", "run_pipeline", "PHASES", "STUDENTS",
           "count_params", "flops_per_sample", "measure_infer_ms"]

PHASES = ("teacher", "distill", "finetune")
STUDENTS = ("dagfm", "dagfm+", "fm")
CHECKPOINT = "checkpoint.pt"


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
    output: str = "runs/dagfm"
    progress: bool = True
    stop_after: str = "finetune"  # last phase to run; the report needs all three
    precision: str = "fp32"  # dagfm_ext.precision.PRECISIONS


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
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} requested but CUDA is not available")
        if self.stop_after not in PHASES:
            raise ValueError(f"stop_after: expected one of {PHASES}, got {self.stop_after!r}")
        check_precision(self.precision, self.device)
        self.cin_layers, self.mlp = tuple(self.cin_layers), tuple(self.mlp)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_sample(module: nn.Module, num_fields: int, embed_dim: int) -> int:
    """Analytic count when the module provides one, else torch's FLOP counter on one sample."""
    fn = getattr(module, "flops_per_sample", None)
    if callable(fn):
        return int(fn())
    from torch.utils.flop_counter import FlopCounterMode
    p = next(module.parameters(), None)
    emb = torch.zeros(1, num_fields, embed_dim, device=p.device if p is not None else "cpu")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(emb)
    return int(counter.get_total_flops())


def measure_infer_ms(embedding: nn.Module, module: nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    """Median wall time (ms) of embedding lookup + forward for one batch, no grad, eval mode."""
    was = module.training
    module.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            module(embedding(x))
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            if i >= 3:  # warm-up
                times.append(time.perf_counter() - t0)
    module.train(was)
    return float(np.median(times) * 1e3)


def _atomic_write_bytes(path: Path, writer) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, lambda f: f.write(text.encode()))


class Pipeline:
    """Runs (or resumes) the three phases for one ``RunConfig``; ``run()`` returns the report."""

    def __init__(self, cfg: RunConfig, resume: bool = False, data: Optional[TabularData] = None):
        self.ctx = distributed.context()
        self.out = Path(cfg.output)
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.out / CHECKPOINT
        state = None
        if ckpt_path.exists():
            if not resume:
                raise FileExistsError(f"output: {self.out} already holds a run ({CHECKPOINT}); "
                                      "pass --resume to continue it or choose another --output")
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            saved = RunConfig.from_dict(state["config"])
            # Continue the saved run; only where it runs and how it talks may change.
            saved.device, saved.progress, saved.output = cfg.device, cfg.progress, cfg.output
            cfg = saved
        self.cfg = cfg.validate()
        self.device = torch.device(cfg.device)
        self.precision = Precision(cfg.precision, self.device)
        if state is None:
            random.seed(cfg.seed)
            np.random.seed(cfg.seed % 2**32)
            torch.manual_seed(cfg.seed)
        if data is None:
            # Rank 0 first: it fills the download cache the others then read. Each rank has its
            # own work dir, since a memmap being written must not be one another rank has mapped.
            work_dir = self.out / "data" / (f"rank{self.ctx.rank}" if self.ctx.distributed else "")
            if not self.ctx.is_main:
                self.ctx.barrier()
            data = load_dataset(cfg.dataset, seed=cfg.seed, min_count=cfg.min_count, work_dir=work_dir,
                                synthetic_size=cfg.synthetic_size)
            if self.ctx.is_main:
                self.ctx.barrier()
        self.data = data
        if state is not None:
            # The vocabularies must be those the saved weights were trained with.
            if state["schema"] != self.data.schema.to_dict():
                raise RuntimeError(f"resume: the dataset {cfg.dataset!r} no longer encodes as the "
                                   f"checkpoint in {self.out} expects (vocabularies differ)")
            self.data.schema = FeatureSchema.from_dict(state["schema"])
        self.model = build_model(cfg, self.data.schema).to(self.device)
        self.phase_idx, self.epoch, self.bad_epochs = 0, 0, 0
        self.best_auc, self.best_epoch, self.best_state = -math.inf, 0, None
        self.history: list = []
        self.summaries: list = []
        self.teacher_test_logits: Optional[np.ndarray] = None
        self.optimizer = self._make_optimizer()
        self._ddp: Optional[Tuple[int, nn.Module]] = None
        if state is not None:
            self._load_state(state)

    # -- phases -------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return PHASES[self.phase_idx]

    def _trainable(self):
        m = self.model
        if self.phase == "teacher":
            return list(m.embedding.parameters()) + list(m.teacher.parameters())
        if self.phase == "distill":
            return list(m.student.parameters())
        return list(m.embedding.parameters()) + list(m.student.parameters())

    def _make_optimizer(self):
        if self.phase_idx >= len(PHASES):
            return None
        return torch.optim.Adam(self._trainable(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _phase_module(self) -> nn.Module:
        return self.model.teacher if self.phase == "teacher" else self.model.student

    def _phase_state(self) -> dict:
        # What a phase changes: its network and (except in distillation) the embeddings.
        keep = {"teacher": ("embedding.", "teacher."), "distill": ("student.",),
                "finetune": ("embedding.", "student.")}[self.phase]
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if k.startswith(keep)}

    # -- checkpointing ------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "format": 1, "config": asdict(self.cfg), "schema": self.data.schema.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "phase_idx": self.phase_idx, "epoch": self.epoch, "bad_epochs": self.bad_epochs,
            "best_auc": self.best_auc, "best_epoch": self.best_epoch, "best_state": self.best_state,
            "history": self.history, "summaries": self.summaries,
            "teacher_test_logits": self.teacher_test_logits,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def _load_state(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.phase_idx, self.epoch, self.bad_epochs = s["phase_idx"], s["epoch"], s["bad_epochs"]
        self.best_auc, self.best_epoch, self.best_state = s["best_auc"], s["best_epoch"], s["best_state"]
        self.history, self.summaries = s["history"], s["summaries"]
        self.teacher_test_logits = s["teacher_test_logits"]
        self.optimizer = self._make_optimizer()
        if self.optimizer is not None and s["optimizer"] is not None:
            self.optimizer.load_state_dict(s["optimizer"])
        torch.set_rng_state(s["rng"]["torch"])
        np.random.set_state(s["rng"]["numpy"])
        random.setstate(s["rng"]["python"])
        if s["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["rng"]["cuda"])

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            state = self._state()
            _atomic_write_bytes(self.out / CHECKPOINT, lambda f: torch.save(state, f))
            self._write_logs()
        # No rank starts the next epoch before this checkpoint is on disk: a rank killed there
        # resumes from this epoch, not an older one.
        self.ctx.barrier()

    def _write_logs(self) -> None:
        _atomic_write_text(self.out / "log.json", json.dumps(self.history, indent=1))
        cols = ["phase", "epoch", "train_loss", "val_auc", "val_logloss", "val_logit_mse", "best", "seconds"]
        lines = [",".join(cols)] + [",".join("" if r.get(c) is None else str(r.get(c)) for c in cols)
                                    for r in self.history]
        _atomic_write_text(self.out / "log.csv", "\n".join(lines) + "\n")

    # -- training and evaluation --------------------------------------------------------------
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

    def _trainer(self) -> nn.Module:
        """What a training step calls: encoded rows -> logits (embeddings + network), or in
        distillation embeddings -> student logits; wrapped in DDP when there are several ranks."""
        m = self.model
        net = m.student if self.phase == "distill" else Scorer(m.embedding, self._phase_module())
        if not self.ctx.distributed:
            return net
        if self._ddp is None or self._ddp[0] != self.phase_idx:
            # One wrapper per phase: DDP registers the parameters that require grad at construction.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = (self.phase_idx, DistributedDataParallel(net, device_ids=ids))
        return self._ddp[1]

    def _train_epoch(self) -> float:
        cfg, m, ctx = self.cfg, self.model, self.ctx
        net = self._trainer()
        m.train()
        m.teacher.train(self.phase == "teacher")  # the teacher is only a target in phase 2
        bce = nn.functional.binary_cross_entropy_with_logits
        rng = np.random.default_rng([cfg.seed, self.phase_idx, self.epoch])
        total, n, size = 0.0, 0, self.data.size("train")
        steps = math.ceil(size / cfg.batch_size)
        batches = self.data.batches("train", cfg.batch_size, shuffle=True, rng=rng, rank=ctx.rank,
                                    world_size=ctx.world_size)
        bar = tqdm(batches, total=steps, desc=f"{self.phase} {self.epoch + 1}/{cfg.max_epochs}", leave=False,
                   disable=not (cfg.progress and ctx.is_main), file=sys.stderr, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device), y.to(self.device)
            # Means over the *global* batch: DDP averages gradients over the ranks, so each rank's
            # sum is divided by the global row count and multiplied by the world size. Then W ranks
            # step exactly as one process does on the whole batch, even when shares differ by a row.
            rows = min(cfg.batch_size, size - step * cfg.batch_size)
            mean = lambda t: t.sum() / rows  # noqa: E731
            with self.precision.forward():
                if self.phase == "distill":
                    with torch.no_grad():
                        emb = m.embedding(x)
                        t_logit = m.teacher(emb)
                    s_logit, t_logit = net(emb).float(), t_logit.float()  # the logit MSE in float32
                    loss = cfg.alpha * mean(bce(s_logit, y, reduction="none")) + cfg.beta * mean((t_logit - s_logit) ** 2)
                else:
                    loss = mean(bce(net(x), y, reduction="none"))
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.backward_step(loss * ctx.world_size, self.optimizer)
            total += loss.item() * rows  # this rank's share of the batch's summed loss
            n += len(y)
            bar.set_postfix(loss=f"{total / max(n, 1):.4f}", refresh=False)
        bar.close()
        total, n = ctx.sum([total, n], self.device)
        return total / max(n, 1)

    def _run_phase(self) -> None:
        cfg = self.cfg
        while self.epoch < cfg.max_epochs and self.bad_epochs < cfg.patience:
            t0 = time.perf_counter()
            train_loss = self._train_epoch()
            logits, y = self._logits("val", self._phase_module())
            val = metrics.evaluate_logits(y, logits)
            val_mse = None
            if self.phase == "distill":
                t_logits, _ = self._logits("val", self.model.teacher)
                val_mse = float(np.mean((t_logits - logits) ** 2))
            self.epoch += 1
            improved = val["auc"] > self.best_auc
            if improved:
                self.best_auc, self.best_epoch, self.bad_epochs = val["auc"], self.epoch, 0
                self.best_state = self._phase_state()
            else:
                self.bad_epochs += 1
            self.history.append({"phase": self.phase, "epoch": self.epoch, "train_loss": train_loss,
                                 "val_auc": val["auc"], "val_logloss": val["logloss"],
                                 "val_logit_mse": val_mse, "best": improved,
                                 "seconds": round(time.perf_counter() - t0, 3)})
            self._say(f"[{self.phase}] epoch {self.epoch}: loss {train_loss:.4f}  val AUC {val['auc']:.4f}"
                      f"  LogLoss {val['logloss']:.4f}" + (f"  logit MSE {val_mse:.4g}" if val_mse is not None else "")
                      + ("  *" if improved else ""))
            self.save_checkpoint()
        self._finish_phase()

    def _finish_phase(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state, strict=False)
        net = self._phase_module()
        logits, y = self._logits("test", net)
        test = metrics.evaluate_logits(y, logits)
        summary = {"phase": self.phase, "epochs": self.epoch, "best_epoch": self.best_epoch,
                   "best_val_auc": self.best_auc if math.isfinite(self.best_auc) else None,
                   "test_auc": test["auc"], "test_logloss": test["logloss"]}
        if self.phase == "teacher":
            self.teacher_test_logits = logits
        elif self.teacher_test_logits is not None:
            summary["test_logit_mse"] = float(np.mean((logits - self.teacher_test_logits) ** 2))
        self.summaries.append(summary)
        self._say(f"[{self.phase}] best epoch {self.best_epoch}: test AUC {test['auc']:.4f}  "
                  f"LogLoss {test['logloss']:.4f}")
        self.phase_idx += 1
        self.epoch, self.bad_epochs, self.best_auc, self.best_epoch, self.best_state = 0, 0, -math.inf, 0, None
        self.optimizer = self._make_optimizer()
        self.save_checkpoint()

    def _say(self, msg: str) -> None:
        if self.cfg.progress and self.ctx.is_main:
            tqdm.write(msg, file=sys.stderr)

    def run(self) -> Optional[dict]:
        """Run the remaining phases; returns the report (None if stopped before finetuning, and
        on every rank but 0)."""
        last = PHASES.index(self.cfg.stop_after)
        while self.phase_idx <= last:
            self._run_phase()
        if self.phase_idx < len(PHASES):
            return None
        report = None
        if self.ctx.is_main:
            report = self.report()
            _atomic_write_text(self.out / "report.json", json.dumps(report, indent=2))
        self.ctx.barrier()  # when run() returns on any rank, report.json is on disk
        return report

    def report(self) -> dict:
        m, cfg, F = self.model, self.cfg, self.data.schema.num_fields
        by_phase = {s["phase"]: s for s in self.summaries}
        x = next(self.data.batches("test", cfg.batch_size))[0].to(self.device)
        out = {}
        for role, net, phase in (("teacher", m.teacher, "teacher"), ("student", m.student, "finetune")):
            out[role] = {"test_auc": by_phase[phase]["test_auc"], "test_logloss": by_phase[phase]["test_logloss"],
                         "params": count_params(net), "flops": flops_per_sample(net, F, cfg.embed_dim),
                         "infer_ms": measure_infer_ms(m.embedding, net, x)}
        out["phases"] = list(self.summaries)
        cfg_d = asdict(cfg)
        cfg_d.update(cin_layers=list(cfg.cin_layers), mlp=list(cfg.mlp), embedding_params=count_params(m.embedding),
                     infer_batch=int(x.shape[0]), torch_threads=torch.get_num_threads())
        out["config"] = cfg_d
        return out


def run_pipeline(cfg: RunConfig, resume: bool = False, data: Optional[TabularData] = None) -> Optional[dict]:
    return Pipeline(cfg, resume=resume, data=data).run()


def format_table(report: dict) -> str:
    """The teacher-vs-student table the CLI prints."""
    cfg = report["config"]
    head = f"{'':9}{'test AUC':>10}{'LogLoss':>10}{'params':>12}{'FLOPs/sample':>14}{'infer ms/batch':>16}"
    rows = [head, "-" * len(head)]
    for role in ("teacher", "student"):
        r = report[role]
        rows.append(f"{role:9}{r['test_auc']:>10.4f}{r['test_logloss']:>10.4f}{r['params']:>12,}"
                    f"{r['flops']:>14,}{r['infer_ms']:>16.3f}")
    rows.append(f"teacher={cfg['teacher']}  student={cfg['student']}({cfg['interaction']}, depth {cfg['depth']})  "
                f"dataset={cfg['dataset']}  device={cfg['device']}  batch={cfg['infer_batch']}  "
                f"shared embedding params={cfg['embedding_params']:,} (not in 'params')")
    return "\n".join(rows)

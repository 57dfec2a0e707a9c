"""What a run reports: the per-epoch log files, the teacher-vs-student report (quality, size,
cost, speed) and the table the CLI prints from it."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .fileio import atomic_write_text

__all__ = ["count_params", "flops_per_sample", "measure_infer_ms", "build_report", "format_table",
           "write_logs", "epoch_line", "LOG_COLUMNS"]

LOG_COLUMNS = ("phase", "epoch", "train_loss", "val_auc", "val_gauc", "val_logloss", "val_logit_mse", "best",
               "seconds")


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


def build_report(model: nn.Module, cfg, summaries: list, x: torch.Tensor, num_fields: int) -> dict:
    """The report of a finished run: test metrics of the teacher and the finetuned student, their
    parameters, FLOPs per sample and inference time on the batch ``x``, the phase summaries and
    the config (``cfg``, a ``RunConfig``)."""
    by_phase = {s["phase"]: s for s in summaries}
    out = {}
    for role, net, phase in (("teacher", model.teacher, "teacher"), ("student", model.student, "finetune")):
        out[role] = {"test_auc": by_phase[phase]["test_auc"], "test_logloss": by_phase[phase]["test_logloss"],
                     "params": count_params(net), "flops": flops_per_sample(net, num_fields, cfg.embed_dim),
                     "infer_ms": measure_infer_ms(model.embedding, net, x)}
    out["phases"] = list(summaries)
    cfg_d = cfg.to_dict()
    cfg_d.update(cin_layers=list(cfg.cin_layers), mlp=list(cfg.mlp),
                 embedding_params=count_params(model.embedding), infer_batch=int(x.shape[0]),
                 torch_threads=torch.get_num_threads())
    out["config"] = cfg_d
    return out


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


def write_logs(out_dir: Path, history: list) -> None:
    """The epoch log as ``log.json`` and ``log.csv`` (one row per finished epoch)."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "log.json", json.dumps(history, indent=1))
    lines = [",".join(LOG_COLUMNS)] + [",".join("" if r.get(c) is None else str(r.get(c)) for c in LOG_COLUMNS)
                                       for r in history]
    atomic_write_text(out_dir / "log.csv", "\n".join(lines) + "\n")


def epoch_line(row: dict) -> str:
    """One line of progress for a finished epoch (a ``log.json`` row)."""
    mse = row["val_logit_mse"]
    return (f"[{row['phase']}] epoch {row['epoch']}: loss {row['train_loss']:.4f}  val AUC {row['val_auc']:.4f}"
            f"  LogLoss {row['val_logloss']:.4f}" + (f"  logit MSE {mse:.4g}" if mse is not None else "")
            + ("  *" if row["best"] else ""))

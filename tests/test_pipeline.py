"""The three-phase pipeline and the CLI: report, logs, kill-and-resume, errors, planted interactions."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_log

import dagfm_ext

from dagfm_ext.cli import main
from dagfm_ext.data import make_synthetic
from dagfm_ext.checkpoint import CHECKPOINT
from dagfm_ext.config import PHASES, RunConfig
from dagfm_ext.distill import Pipeline, run_pipeline

REPORT_KEYS = {"test_auc", "test_logloss", "params", "flops", "infer_ms"}
SMALL = ["--dataset", "synthetic", "--synthetic-size", "2000", "--embed-dim", "4", "--batch-size", "128",
         "--max-epochs", "3", "--patience", "3", "--depth", "2", "--teacher-depth", "2", "--seed", "5", "--quiet"]


def small_cfg(out, **kw):
    base = dict(dataset="synthetic", synthetic_size=2000, embed_dim=4, batch_size=128, max_epochs=3, patience=3,
                depth=2, teacher_depth=2, seed=5, output=str(out), progress=False, device="cpu")
    base.update(kw)
    return RunConfig(**base)


def check_report(out: Path):
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"teacher", "student", "phases", "config"}
    for role in ("teacher", "student"):
        assert set(report[role]) == REPORT_KEYS
        assert 0 <= report[role]["test_auc"] <= 1 and report[role]["params"] > 0 and report[role]["flops"] > 0
    assert [p["phase"] for p in report["phases"]] == list(PHASES)
    return report


def test_cli_run_writes_report_logs_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--interaction", "outer", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "teacher" in table and "student" in table and "FLOPs/sample" in table
    report = check_report(out)
    assert report["config"]["interaction"] == "outer" and report["config"]["alpha"] == 0.1
    assert report["config"]["beta"] == 921.6
    assert report["student"]["params"] < report["teacher"]["params"]
    log = json.loads((out / "log.json").read_text())
    assert len(log) == sum(p["epochs"] for p in report["phases"])
    assert (out / "log.csv").read_text().count("\n") == len(log) + 1
    # a second run into the same directory must not silently overwrite it
    assert main(["run", *SMALL, "--output", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # the checkpoint carries the schema, so raw values can be mapped at inference
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)  # tensors and plain data only
    assert ckpt["schema"]["fields"][0]["name"] == "f0" and ckpt["phase_idx"] == 3


def test_phase_mechanics(tmp_path):
    """Distillation leaves the embeddings and the teacher untouched; each phase restores its best epoch."""
    p = Pipeline(small_cfg(tmp_path / "a", stop_after="teacher"))
    p.run()
    emb, teacher = (p.model.embedding.table.weight.detach().clone(),
                    {k: v.clone() for k, v in p.model.teacher.state_dict().items()})
    p.cfg.stop_after = "distill"
    p.run()
    assert torch.equal(p.model.embedding.table.weight, emb)
    assert all(torch.equal(v, p.model.teacher.state_dict()[k]) for k, v in teacher.items())
    s = p.summaries[1]
    assert s["phase"] == "distill" and s["test_logit_mse"] >= 0
    best = max((r for r in p.history if r["phase"] == "distill"), key=lambda r: r["val_auc"])
    assert s["best_epoch"] == best["epoch"] and s["best_val_auc"] == best["val_auc"]


def _spawn(args, env):
    return subprocess.Popen([sys.executable, "-m", "dagfm_ext", "run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_kill_mid_phase_and_resume(tmp_path):
    """SIGKILL the CLI in the middle of the distillation phase, resume it, and end exactly where an
    uninterrupted run ends."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [*SMALL, "--synthetic-size", "6000", "--max-epochs", "4", "--patience", "4"]
    out = tmp_path / "killed"
    proc = _spawn([*args, "--output", str(out)], env)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        log = run_log(out)
        if any(r["phase"] == "distill" for r in log):
            proc.send_signal(signal.SIGKILL)
            killed_at = len(log)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_at is not None, f"run ended before distillation started: {proc.stderr.read()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)  # tensors and plain data only
    assert ckpt["phase_idx"] == 1 and 1 <= ckpt["epoch"] < 4  # killed inside phase 2

    resumed = _spawn([*args, "--output", str(out), "--resume"], env)
    stdout, stderr = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, stderr[-2000:]
    check_report(out)
    assert not list(out.glob("*.tmp"))  # a write cut by the kill leaves nothing behind

    ref = tmp_path / "ref"
    run_pipeline(small_cfg(ref, synthetic_size=6000, max_epochs=4, patience=4))
    got = json.loads((out / "log.json").read_text())
    want = json.loads((ref / "log.json").read_text())
    assert [(r["phase"], r["epoch"]) for r in got] == [(r["phase"], r["epoch"]) for r in want]
    np.testing.assert_allclose([r["val_auc"] for r in got], [r["val_auc"] for r in want], rtol=0, atol=1e-6)


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--teacher", "resnet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and "resnet" in err and "crossnet" in err
    with pytest.raises(SystemExit):
        main(["run", "--dataset", "avazu"])
    assert "--dataset" in capsys.readouterr().err
    assert main(["run", "--dataset", f"criteo:{tmp_path / 'missing.tsv'}", "--quiet",
                 "--output", str(tmp_path / "o1")]) == 2
    assert "criteo: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t" + "\t".join(["1"] * 13 + ["a"] * 26) + "\n" + "0\t1\t2\n")
    assert main(["run", "--dataset", f"criteo:{bad}", "--quiet", "--output", str(tmp_path / "o2")]) == 2
    assert f"{bad}:2: expected 40 tab-separated columns" in capsys.readouterr().err
    with pytest.raises(ValueError, match="teacher: unknown name 'nope'"):
        RunConfig(teacher="nope").validate()


def test_bench_subcommand_is_lazy(monkeypatch, capsys, tmp_path):
    # Makes 'from . import bench' fail, also when an earlier test already imported it.
    monkeypatch.setitem(sys.modules, "dagfm_ext.bench", None)
    monkeypatch.delattr(dagfm_ext, "bench", raising=False)
    assert main(["bench"]) == 2
    assert "benchmark module could not be loaded" in capsys.readouterr().err
    assert main(["run", *SMALL, "--max-epochs", "1", "--output", str(tmp_path / "r")]) == 0


def test_planted_interactions_student_matches_teacher_better_than_fm(tmp_path):
    """Teacher logits on data with planted order-1..4 interactions: the distilled DAGFM's test
    logit MSE to the teacher must be at least 10x lower than a plain FM's distilled the same way."""
    data = make_synthetic(n=4000, num_fields=4, vocab=6, seed=0)
    mse = {}
    for student in ("dagfm", "fm"):
        cfg = RunConfig(dataset="synthetic", student=student, embed_dim=16, batch_size=128, lr=0.02, max_epochs=12,
                        patience=4, seed=0, output=str(tmp_path / student), progress=False, stop_after="distill")
        p = Pipeline(cfg, data=data)
        p.run()
        mse[student] = p.summaries[1]["test_logit_mse"]
    assert mse["dagfm"] * 10 <= mse["fm"], mse

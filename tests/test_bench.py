"""The speedup comparison (``dagfm-ext bench``): its JSON, its plot, and that a wrong op is never timed."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import dagfm_ext
from dagfm_ext import bench, reference


def _args(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def _quick_shapes():
    return bench.default_shapes("cpu", quick=True)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One in-process run of exactly the CI smoke command: bench --quick --device cpu --json --plot."""
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "out.json", out / "out.png"
    rc = bench.main(_args(["--quick", "--device", "cpu", "--json", str(json_path), "--plot", str(png_path)]))
    with open(json_path) as f:
        report = json.load(f)
    return rc, report, png_path


def test_quick_json_has_every_median_and_speedup(quick_run):
    rc, report, _ = quick_run
    assert rc == 0, [r.get("error") for r in report["results"] if r["status"] != "ok"]
    assert report["ok"] is True
    rows = {(r["shape"], r["interaction"], r["pass"]): r for r in report["results"]}
    for B, F, D, L in _quick_shapes():
        for interaction in bench.INTERACTIONS:
            for pass_ in bench.PASSES:
                r = rows[(f"{B}:{F}:{D}:{L}", interaction, pass_)]
                assert r["status"] == "ok"
                assert r["correctness"]["ok"] is True
                for impl in ("fused", "eager"):
                    assert r[f"{impl}_ms"] > 0
                    assert r["timings"][impl]["median_ms"] == r[f"{impl}_ms"]
                assert r["speedup_vs_eager"] == pytest.approx(r["eager_ms"] / r["fused_ms"])
                # compiled: a median and a speedup, or n/a with the reason torch.compile failed here
                if r["compiled_ms"] is None:
                    assert r["compiled_error"] and r["speedup_vs_compiled"] is None
                else:
                    assert r["compiled_ms"] > 0
                    assert r["speedup_vs_compiled"] == pytest.approx(r["compiled_ms"] / r["fused_ms"])
                    assert r["peers"]["compiled"]["compile_s"] > 0  # compile time kept out of the median
                assert r["flops"] > 0 and r["fused_GFLOPs"] > 0 and 0 < r["roofline_fraction"]


def test_quick_json_environment(quick_run):
    _, report, _ = quick_run
    env = report["environment"]
    for key in ("torch", "date", "command", "cpu_model", "cpu_count", "threads", "devices"):
        assert env[key] not in (None, "")
    assert env["torch"] == torch.__version__
    assert env["threads"] == torch.get_num_threads()
    assert report["roofline"]["cpu"]["copy_GBps"] > 0 and report["roofline"]["cpu"]["fp_GFLOPs"] > 0


def test_quick_plot_is_a_png(quick_run):
    pytest.importorskip("matplotlib")  # the optional "plot" extra
    _, _, png = quick_run
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quick_student_teacher_rows(quick_run):
    _, report, _ = quick_run
    rows = report["student_teacher"]
    assert {r["interaction"] for r in rows} == set(bench.INTERACTIONS)
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert r["student_fused_ms"] > 0 and r["teacher_ms"] > 0 and r["teacher_over_student_fused"] > 0


def _wrong_values(h0, p, q=None, interaction="inner"):
    return reference.dagfm_propagate(h0, p, q, interaction) * 1.001 + 1e-3


class _WrongGradient(torch.autograd.Function):
    """Right forward, gradient of h0 off by 1%."""

    @staticmethod
    def forward(ctx, h0, p):
        ctx.save_for_backward(h0, p)
        with torch.no_grad():
            return reference.dagfm_propagate(h0, p, None, "inner")

    @staticmethod
    def backward(ctx, g):
        h0, p = ctx.saved_tensors
        with torch.enable_grad():
            h0_, p_ = h0.detach().requires_grad_(), p.detach().requires_grad_()
            gh, gp = torch.autograd.grad(reference.dagfm_propagate(h0_, p_, None, "inner"), (h0_, p_), g)
        return gh * 1.01, gp


def _wrong_gradient(h0, p, q=None, interaction="inner"):
    return _WrongGradient.apply(h0, p)


def _raises(h0, p, q=None, interaction="inner"):
    raise RuntimeError("kernel exploded")


@pytest.mark.parametrize("broken, failing_passes", [
    (_wrong_values, {"fwd", "fwd+bwd"}),
    (_wrong_gradient, {"fwd+bwd"}),
    (_raises, {"fwd", "fwd+bwd"}),
], ids=["wrong-values", "wrong-gradient", "raises"])
def test_broken_op_is_reported_not_timed(monkeypatch, tmp_path, capsys, broken, failing_passes):
    monkeypatch.setattr(dagfm_ext, "dagfm_propagate", broken)
    json_path = tmp_path / "out.json"
    rc = bench.main(_args(["--quick", "--device", "cpu", "--shapes", "64:7:3:2", "--interactions", "inner",
                           "--no-compile", "--no-student", "--json", str(json_path)]))
    printed = capsys.readouterr().out
    assert rc == 1
    report = json.loads(json_path.read_text())
    assert report["ok"] is False
    for r in report["results"]:
        if r["pass"] in failing_passes:
            assert r["status"] == "FAILED"
            assert "fused_ms" not in r and "timings" not in r  # never a time for a wrong answer
        else:
            assert r["status"] == "ok" and r["fused_ms"] > 0
    assert "FAILED" in printed


def test_correct_op_small_shapes_pass(tmp_path):
    rc = bench.main(_args(["--device", "cpu", "--shapes", "33:5:3:2", "1:1:1:1", "--no-compile", "--no-student",
                           "--rounds", "1", "--min-block-ms", "1", "--dtype", "float64",
                           "--json", str(tmp_path / "o.json")]))
    assert rc == 0
    report = json.loads((tmp_path / "o.json").read_text())
    assert len(report["results"]) == 2 * 3 * 2
    assert all(r["compiled_ms"] is None and "no-compile" in r["compiled_error"] for r in report["results"])


def test_core_preset_shape():
    args = _args(["--core"])
    assert args.core
    assert bench.CORE_SHAPES == [(4096, 39, 16, 3)]


@pytest.mark.parametrize("text", ["4096:39:16", "a:b:c:d", "0:39:16:3", ""])
def test_parse_shapes_rejects(text):
    with pytest.raises(ValueError, match="--shapes"):
        bench.parse_shapes(text)


def test_parse_shapes():
    assert bench.parse_shapes(["1024:39:16:3,8:2:3:1", "5:6:7:8"]) == [(1024, 39, 16, 3), (8, 2, 3, 1),
                                                                      (5, 6, 7, 8)]


def test_bad_arguments_exit_2():
    assert bench.main(_args(["--interactions", "inner,bogus"])) == 2
    assert bench.main(_args(["--passes", "bwd"])) == 2
    assert bench.main(_args(["--device", "tpu"])) == 2


def test_flop_and_byte_model():
    # inner forward at B=1, F=1, D=1, L=1: one edge (2 FLOPs) + h0*a and the state sum (2) + s^0 (1)
    assert bench.useful_flops((1, 1, 1, 1), "inner", "fwd") == 5
    assert bench.useful_flops((10, 39, 16, 3), "kernel", "fwd") == 10 * bench.useful_flops((1, 39, 16, 3),
                                                                                            "kernel", "fwd")
    assert bench.min_bytes((2, 3, 4, 1), "inner", "fwd", 4) == 4 * (2 * 3 * 4 + 2 * 2 * 3 + 6 * 4)


def test_flop_and_byte_model_training_pass():
    # inner fwd+bwd at B=1, F=1, D=1, L=1: the forward's 5, then dP and delta on the edge (4), alpha (1),
    # dh0 += delta * a (2) and the final dh0 += delta (1)
    assert bench.useful_flops((1, 1, 1, 1), "inner", "fwd+bwd") == 13
    # the training forward writes the kept messages (B*L*F*D) and the backward reads them back
    B, F, D, L = 2, 3, 4, 1
    fwd = B * F * D + B * (L + 1) * F + 6 * D
    bwd = B * (L + 1) * F + 2 * B * F * D + 2 * 6 * D
    assert bench.min_bytes((B, F, D, L), "inner", "fwd+bwd", 4) == 4 * (fwd + 2 * B * L * F * D + bwd)


@pytest.mark.parametrize("interaction", ["inner", "outer", "kernel"])
def test_student_flops_use_the_op_cost(interaction):
    from dagfm_ext.modules import DAGFM, DAGFMPlus
    F, D, L = 5, 4, 2
    mixing, readout = 2 * F * F * D, 2 * (L + 1) * F + 1
    assert DAGFM(F, D, L, interaction).flops_per_sample() == (
        mixing + bench.useful_flops((1, F, D, L), interaction, "fwd") + readout)
    # DAGFM+ keeps a running sum of the h^t instead of the per-field state sums: (L + 1) * F * D fewer
    # than the op's forward, L * F * D more for the sum, then the MLP on (F * D)
    mlp = (2 * F * D * 8 + 8) + (2 * 8 + 1)
    assert DAGFMPlus(F, D, L, interaction, mlp=(8,)).flops_per_sample() == (
        mixing + bench.useful_flops((1, F, D, L), interaction, "fwd") - F * D + mlp)


def test_plot_without_matplotlib_is_an_error_before_the_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an interpreter without matplotlib sees
    png = tmp_path / "speedup.png"
    rc = bench.main(_args(["--device", "cpu", "--shapes", "8:2:2:1", "--interactions", "inner", "--no-compile",
                           "--no-student", "--rounds", "1", "--min-block-ms", "1", "--plot", str(png)]))
    captured = capsys.readouterr()
    assert rc == 2
    assert not png.exists()
    assert "| 8x2x2x1 |" not in captured.out  # refused before anything was benchmarked
    message = captured.err.strip().splitlines()
    assert len(message) == 1 and "--plot" in message[0] and "pip install" in message[0]
    assert "matplotlib" in message[0]


def test_cli_entry_point_runs_bench(tmp_path):
    """`python -m dagfm_ext bench` goes through the CLI to this module (a fresh process, as CI runs it)."""
    json_path = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "dagfm_ext", "bench", "--device", "cpu", "--shapes", "16:4:2:1",
           "--interactions", "inner", "--no-compile", "--no-student", "--rounds", "1", "--min-block-ms", "1",
           "--json", str(json_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(json_path.read_text())["ok"] is True
    assert "| 16x4x2x1 | inner |" in res.stdout

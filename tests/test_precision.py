"""Mixed precision: the ops under torch.autocast, the training precisions of `dagfm-ext run`, and a
bfloat16 DAGFM+ run carried through export and predict."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import dagfm_ext
from dagfm_ext.cli import main
from dagfm_ext.distill import Pipeline, RunConfig
from dagfm_ext.modules import DAGFM, DAGFMPlus
from dagfm_ext.precision import Precision, check_precision
from dagfm_ext.serving import Scorer
from dagfm_ext import reference
from dagfm_ext.testing import make_inputs, rel_err

KINDS = ("inner", "outer", "kernel")
# bfloat16 keeps 8 significant bits (relative rounding 2^-9); the logits of these small networks
# stay within a few roundings of float32.
BF16_TOL = 2e-2


def norm_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def eager_logits(model, emb):
    """The model with its propagation as the reference's einsum recurrence (plain PyTorch ops,
    which autocast runs in bfloat16 where it has a rule for them)."""
    h0 = model.mixed(emb)
    states, z = reference.dagfm_propagate_with_sum(h0, model.p, model.q, model.interaction)
    if isinstance(model, DAGFMPlus):
        return model.mlp(z.reshape(z.shape[0], -1)).squeeze(-1)
    return model.linear(states.reshape(states.shape[0], -1)).squeeze(-1)


def forward_backward(fn, model, emb):
    emb = emb.detach().clone().requires_grad_()
    out = fn(emb)
    grads = torch.autograd.grad(out.float().exp().sum(), [emb, *model.parameters()])
    return out.detach().float(), grads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", [DAGFM, DAGFMPlus])
def test_cpu_autocast_bfloat16_matches_float32(kind, cls):
    torch.manual_seed(0)
    model = cls(9, 8, 3, kind)
    emb = torch.randn(64, 9, 8)
    out32, grads32 = forward_backward(model, model, emb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, grads16 = forward_backward(model, model, emb)
        _, eager16 = forward_backward(lambda x: eager_logits(model, x), model, emb)
    assert 0 < norm_err(out16, out32) < BF16_TOL  # autocast did run the matmuls in bfloat16
    # The loss sum(exp(logit)) gives every logit a positive weight, so no gradient is a cancelling
    # sum; gradients add up many bfloat16 products, so their bound is also what autocast gives the
    # same network in plain PyTorch.
    names = ["emb"] + [n for n, _ in model.named_parameters()]
    for name, a, b, e in zip(names, grads16, grads32, eager16):
        assert a.dtype == torch.float32, name  # gradients of float32 leaves stay float32
        assert norm_err(a, b) <= max(2 * norm_err(e, b), BF16_TOL), name


@pytest.mark.parametrize("kind", KINDS)
def test_ops_under_cpu_autocast_run_in_float32(kind):
    h0, p, q = make_inputs(kind, 6, 4, 3, 2, dtype=torch.float32)
    expected = dagfm_ext.dagfm_propagate(h0, p, q, kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # A bfloat16 h0 (the output of an autocast matmul) with float32 weights.
        raw = torch.ops.dagfm_ext.propagate_fwd(h0.bfloat16(), p, q, kind)
        states = dagfm_ext.dagfm_propagate(h0, p, q, kind)
        _, z = dagfm_ext.dagfm_propagate_with_sum(h0.bfloat16(), p, q, kind)
    assert raw.dtype == states.dtype == z.dtype == torch.float32
    torch.testing.assert_close(states, expected, rtol=0, atol=0)
    assert rel_err(raw, expected) < BF16_TOL


def test_float64_is_left_alone_under_autocast():
    h0, p, q = make_inputs("inner", 4, 3, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dagfm_ext.dagfm_propagate(h0, p, q).dtype == torch.float64


def test_compiled_training_step_under_autocast():
    torch.manual_seed(1)
    model = DAGFMPlus(5, 4, 2, "inner", mlp=(8,))
    emb = torch.randn(16, 5, 4)

    def loss_of(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float().square().mean()

    loss = torch.compile(loss_of, fullgraph=True)(emb)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e = loss_of(emb)
    loss_e.backward()
    torch.testing.assert_close(loss, loss_e, rtol=BF16_TOL, atol=1e-3)
    for a, p in zip(grads, model.parameters()):
        assert norm_err(a, p.grad) < BF16_TOL


def test_precision_names_and_devices():
    assert check_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match=r"precision: expected one of \('fp32', 'tf32', 'bf16', 'fp16'\)"):
        check_precision("half", "cpu")
    with pytest.raises(ValueError, match="precision: 'fp16' needs a CUDA device"):
        Precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision: 'fp16' needs a CUDA device"):
        RunConfig(device="cpu", precision="fp16").validate()


def test_tf32_is_set_only_inside_the_step():
    before = torch.get_float32_matmul_precision()
    prec = Precision("tf32", "cpu")
    with prec.forward():
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


def test_cli_rejects_fp16_on_cpu(tmp_path, capsys):
    assert main(["run", "--dataset", "synthetic", "--device", "cpu", "--precision", "fp16", "--quiet",
                 "--output", str(tmp_path / "run")]) == 2
    assert "precision: 'fp16' needs a CUDA device" in capsys.readouterr().err


def test_bfloat16_dagfm_plus_run_exports_and_predicts(tmp_path):
    """`run --student dagfm+ --precision bf16` on CPU, then `export` and `predict` of its student:
    the exported program carries the MLP and scores rows as the in-memory student does."""
    out = tmp_path / "run"
    assert main(["run", "--dataset", "synthetic", "--synthetic-size", "1500", "--student", "dagfm+",
                 "--mlp", "16,8", "--precision", "bf16", "--embed-dim", "4", "--depth", "2",
                 "--teacher-depth", "2", "--batch-size", "128", "--max-epochs", "1", "--patience", "1",
                 "--device", "cpu", "--quiet", "--output", str(out)]) == 0
    p = Pipeline(RunConfig(output=str(out)), resume=True, given=set())  # the finished run, reloaded
    assert p.cfg.student == "dagfm+" and p.cfg.precision == "bf16"
    model = tmp_path / "student.pt2"
    assert main(["export", "--checkpoint", str(out), "--output", str(model)]) == 0
    program = torch.export.load(str(model))
    # Exported for inference: the sum op that keeps no messages for a backward.
    assert any(str(n.target) == "dagfm_ext.propagate_sum_fwd.default" for n in program.graph.nodes)
    assert sum("linear" in str(n.target) for n in program.graph.nodes) == 3  # the MLP's layers

    rng = np.random.default_rng(0)
    names = p.data.schema.names
    records = [{name: str(rng.integers(1, 17)) for name in names} for _ in range(50)]
    with torch.no_grad():
        scorer = Scorer(p.model.embedding, p.model.student).eval()
        want = scorer(torch.as_tensor(p.data.schema.encode(records))).numpy()
    rows = tmp_path / "rows.csv"
    rows.write_text("\n".join([",".join(names)] + [",".join(r[n] for n in names) for r in records]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "dagfm_ext", "predict", "--model", str(model), "--input",
                           str(rows)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.array([float(l.split(",")[0]) for l in proc.stdout.splitlines()[1:]])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_loss_scale_survives_a_checkpoint(tmp_path):
    """The fp16 loss scale is part of the run: a resumed run continues with the scale it had
    reached, not with GradScaler's initial 65536."""
    from dagfm_ext.checkpoint import Progress, checkpoint_state, read_checkpoint, write_checkpoint
    from dagfm_ext.data.synthetic import make_synthetic

    data = make_synthetic(200, seed=0)
    model = torch.nn.Linear(2, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):  # grows once (interval 3) and counts one step towards the next growth
        opt.zero_grad()
        scaler.scale(model(torch.ones(1, 2)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2048.0
    cfg = RunConfig(dataset="synthetic", device="cpu", output=str(tmp_path))
    write_checkpoint(tmp_path, checkpoint_state(cfg, data.schema, model, opt, Progress(), scaler))
    saved = read_checkpoint(tmp_path / "checkpoint.pt")["scaler"]
    restored = torch.amp.GradScaler("cpu", growth_interval=3)
    restored.load_state_dict(saved)
    assert restored.get_scale() == 2048.0 and restored._get_growth_tracker() == 1

    # A run without loss scaling stores none; a checkpoint written before the key existed reads as None.
    plain = checkpoint_state(cfg, data.schema, model, opt, Progress(), torch.amp.GradScaler("cpu", enabled=False))
    assert plain["scaler"] is None
    del plain["scaler"], plain["digest"]
    from dagfm_ext.safe_load import digest
    plain["digest"] = digest(plain)
    write_checkpoint(tmp_path, plain)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["scaler"] is None

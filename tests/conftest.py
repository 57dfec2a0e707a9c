"""What the op tests share: the devices and dtypes to run on, the tolerance per dtype, a runner for
values and gradients, the parity shapes, and the hypothesis profiles.

The random inputs and the relative error come from ``dagfm_ext.testing`` (the benchmarks use them
too); what is only for the tests lives here, importable as ``from conftest import ...``.
"""
from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, settings

import dagfm_ext
from dagfm_ext import reference
from dagfm_ext.reference import INTERACTIONS
from dagfm_ext.testing import make_grad_states, rel_err

# "ci" runs by default and draws the same cases every run, so a failure reproduces on a rerun;
# `pytest --hypothesis-profile=long` searches many more cases, new ones each run (a
# failure prints the blob that reproduces it).
settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2500, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HALF_DTYPES = (torch.float16, torch.bfloat16)


def dtypes_on(device: str) -> tuple:
    """The dtypes a backend computes in: float16 and bfloat16 run on CUDA only."""
    return (torch.float64, torch.float32) + (HALF_DTYPES if device.startswith("cuda") else ())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DEVICE_DTYPES = [pytest.param(device, dtype, id=f"{device}-{dtype_name(dtype)}")
                 for device in DEVICES for dtype in dtypes_on(device)]

# The fused op's largest relative error against float64, per dtype: in float64 a fixed bound; in
# a lower precision twice the error the reference makes in that same dtype, floored at a few ulps
# (the reference can be nearly exact by luck on a small case).
FLOAT64_REL_TOL = 1e-10
LOW_PRECISION_FACTOR = 2
LOW_PRECISION_FLOOR_ULPS = 4


def assert_error_within_tolerance(dtype: torch.dtype, err: float, reference_err: float, what: str,
                                  layers: int = 1) -> None:
    """``err``: the fused op's relative error against float64; ``reference_err``: the reference's
    own in ``dtype`` (unused for float64). Measured on a value computed through ``layers`` layers,
    the floor grows with them: each layer rounds its messages once more."""
    if dtype == torch.float64:
        assert err < FLOAT64_REL_TOL, f"{what}: relative error {err:.3g} in float64"
        return
    floor = LOW_PRECISION_FLOOR_ULPS * layers * torch.finfo(dtype).eps
    tol = LOW_PRECISION_FACTOR * max(reference_err, floor)
    assert err <= tol, f"{what}: relative error {err:.3g} in {dtype_name(dtype)}, the reference's own {reference_err:.3g}"


def assert_close_to_float64(actual: torch.Tensor, same_dtype_reference: torch.Tensor, exact: torch.Tensor,
                            what: str) -> None:
    """``actual`` (the fused op) against ``exact`` (the reference in float64), within the
    tolerance of ``actual``'s dtype; ``same_dtype_reference`` is the reference in that dtype."""
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert same_dtype_reference.dtype == actual.dtype, what
    reference_err = 0.0 if actual.dtype == torch.float64 else rel_err(same_dtype_reference, exact)
    assert_error_within_tolerance(actual.dtype, rel_err(actual, exact), reference_err, what)


def run_with_grads(fn, h0, p, q, interaction, grad_states=None):
    """``fn``'s states and the gradients of <states, grad_states> wrt h0, p (and q).

    The leaves are detached views, so ``fn`` sees the inputs' memory layout (strides, stride-0
    expansions, offsets) unchanged. Returns (states, [grads], grad_states).
    """
    leaves = [t.detach().requires_grad_() for t in (h0, p, q) if t is not None]
    states = fn(leaves[0], leaves[1], leaves[2] if q is not None else None, interaction)
    if grad_states is None:
        B, L1, F = states.shape
        grad_states = make_grad_states(B, F, L1 - 1, dtype=states.dtype, device=states.device)
    if states.numel():
        grads = torch.autograd.grad(states, leaves, grad_states)
    else:
        grads = [torch.zeros_like(t) for t in leaves]
    return states.detach(), [g.detach() for g in grads], grad_states


def fused_and_reference(h0, p, q, interaction, grad_states=None):
    """The fused op, the reference in the inputs' dtype and the reference in float64 on the same
    (already rounded) inputs, each as (states, [grads]) for the same upstream gradient."""
    s, g, grad_states = run_with_grads(dagfm_ext.dagfm_propagate, h0, p, q, interaction, grad_states)
    # The references get contiguous copies: their answer must not depend on the layout under test.
    dense = lambda t, dtype: None if t is None else t.to(dtype).contiguous()
    s64, g64, _ = run_with_grads(reference.dagfm_propagate, dense(h0, torch.float64), dense(p, torch.float64),
                                 dense(q, torch.float64), interaction, dense(grad_states, torch.float64))
    if h0.dtype == torch.float64:
        return (s, g), (s64, g64), (s64, g64)
    dtype = h0.dtype
    s_lo, g_lo, _ = run_with_grads(reference.dagfm_propagate, dense(h0, dtype), dense(p, dtype), dense(q, dtype),
                                   interaction, dense(grad_states, dtype))
    return (s, g), (s_lo, g_lo), (s64, g64)


def lower_triangle(num_fields: int, device) -> torch.Tensor:
    """(F, F) mask of the edges i > j, which the op never reads and whose gradients are zero."""
    return torch.ones(num_fields, num_fields, dtype=torch.bool, device=device).tril(-1)


# Float32 cases kept from the dedicated float32 test, with the seed they were drawn with.
EXTRA_PARITY_SHAPES = [(39, 16, 3, 64, 7), (7, 3, 5, 33, 7), (23, 33, 2, 9, 7)]


def parity_shapes():
    """(interaction, F, D, L, B, seed): random combinations that cover every value of each axis
    (F, D, L, B) for every interaction (F = 1 and F > 64, D = 1 and odd, B = 0 and 1)."""
    Fs, Ds, Ls, Bs = (1, 2, 7, 39, 80), (1, 3, 16, 33), (1, 3, 5), (0, 1, 257)
    rng = random.Random(1234)
    cases = []
    for kind in INTERACTIONS:
        combos = list(itertools.product(Fs, Ds, Ls, Bs))
        rng.shuffle(combos)
        chosen, seen = [], set()
        for F, D, L, B in combos:
            wnum = L * F * F * D * (D if kind == "kernel" else 1)
            work = max(B, 1) * wnum
            if wnum > 3_000_000 or work > 60_000_000:
                continue
            new = {("F", F), ("D", D), ("L", L), ("B", B)} - seen
            if new or len(chosen) < 10:
                chosen.append((F, D, L, B, F * 100 + D * 10 + L))
                seen |= new
        missing = {("F", F) for F in Fs} | {("D", D) for D in Ds} | {("L", L) for L in Ls} | {("B", B) for B in Bs}
        assert missing <= seen, (kind, missing - seen)
        cases += [(kind,) + c for c in chosen + EXTRA_PARITY_SHAPES]
    return cases


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A small finished run (all three phases) and its exported student: (run_dir, model.pt2)."""
    from dagfm_ext.config import RunConfig
    from dagfm_ext.distill import Pipeline
    from dagfm_ext.export import export_checkpoint
    root = tmp_path_factory.mktemp("finished")
    run_dir = root / "run"
    Pipeline(RunConfig(dataset="synthetic", synthetic_size=600, embed_dim=4, batch_size=128, max_epochs=1,
                       patience=1, depth=2, teacher_depth=2, seed=3, progress=False, device="cpu",
                       output=str(run_dir))).run()
    export_checkpoint(run_dir, root / "model.pt2")
    return run_dir, root / "model.pt2"


def run_log(run_dir) -> list:
    """The epoch log of a run that may be writing it right now ([] until a whole one is there)."""
    import json
    from pathlib import Path
    try:
        return json.loads((Path(run_dir) / "log.json").read_text())
    except (OSError, ValueError):
        return []


@pytest.fixture(scope="session", autouse=True)
def private_data_cache(tmp_path_factory):
    """Every test (and the processes it starts) keeps its preprocessed data in a temporary cache
    directory, never in the user's. A MovieLens download already in the user's cache is linked in,
    so the tests that use it neither download it again nor skip."""
    from dagfm_ext.data import cache_dir
    user_ml100k = cache_dir() / "ml-100k"
    root = tmp_path_factory.mktemp("dagfm_ext_cache")
    if (user_ml100k / "ml-100k.inter").exists():
        (root / "ml-100k").symlink_to(user_ml100k, target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("DAGFM_EXT_CACHE", str(root))
    yield root
    patch.undo()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_under_isa(isa: str, body: str, timeout: int = 900) -> None:
    """Runs the Python source ``body`` in a fresh process with DAGFM_CPU_ISA=isa and 2 threads,
    after checking that its loops are ``isa``'s (or lower, on a machine without it); fails with
    the process's output unless it succeeds."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]  # the tests import conftest
        import dagfm_ext
        torch.set_num_threads(2)
        machine_has = {{"avx512": 2, "avx2": 1, "generic": 0}}
        got = torch.ops.dagfm_ext.cpu_isa()
        assert got == {isa!r} or machine_has[got] < machine_has[{isa!r}], got
        print("isa", got)
        """) + textwrap.dedent(body)
    env = dict(os.environ, DAGFM_CPU_ISA=isa, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr

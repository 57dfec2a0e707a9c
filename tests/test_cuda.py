"""CUDA-only checks of the fused kernels, beyond the device-parametrised tests in test_propagate.py:
the global-memory fallback path, determinism, streams, empty and large batches, the upper-triangle
contract and full output coverage. Skipped without a GPU."""
from __future__ import annotations

import functools

import pytest
import torch

import dagfm_ext
from dagfm_ext import reference, testing
from dagfm_ext.reference import INTERACTIONS as KINDS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FALLBACK_ENV = "DAGFM_CUDA_FORCE_GLOBAL_MEMORY"


def set_switch(monkeypatch, name, value):
    """Sets a DAGFM_CUDA_* switch for this test (the extension reads them once per process)."""
    monkeypatch.setenv(name, value)
    dagfm_ext._C._reread_cuda_switches()


@pytest.fixture(autouse=True)
def reread_switches_after_test():
    # Torn down after monkeypatch has restored the environment: the next test sees the defaults.
    yield
    dagfm_ext._C._reread_cuda_switches()

# The shared cases, drawn on the GPU unless a test names another device.
make_inputs = functools.partial(testing.make_inputs, device="cuda")


def run(kind, h0, p, q, grad_states=None):
    """States and (with grad_states) the gradients of <states, grad_states> wrt h0, p, q."""
    s = dagfm_ext.dagfm_propagate(h0, p, q, kind)
    if grad_states is None:
        return s, None
    inputs = [t for t in (h0, p, q) if t is not None]
    grads = torch.autograd.grad(s, inputs, grad_states)
    return s, grads


def run_reference(kind, h0, p, q, grad_states):
    """Float64 reference (on the inputs' device: the GPU's float64 is fast enough for B=65k)."""
    h0, p = h0.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    q = q.detach().double().requires_grad_() if q is not None else None
    s = reference.dagfm_propagate(h0, p, q, kind)
    inputs = [t for t in (h0, p, q) if t is not None]
    return s, torch.autograd.grad(s, inputs, grad_states.detach().double())


def rel(a, b):
    a, b = a.detach().double(), b.detach().double().to(a.device)
    assert torch.isfinite(a).all(), "non-finite values in the output"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_float64(kind, B, F, D, L, seed=0):
    h0, p, q = make_inputs(kind, B, F, D, L, requires_grad=True, seed=seed)
    gs = torch.randn(B, L + 1, F, dtype=torch.float64, device="cuda")
    s, grads = run(kind, h0, p, q, gs)
    s_ref, grads_ref = run_reference(kind, h0, p, q, gs)
    assert rel(s, s_ref) < 1e-10
    for name, g, g_ref in zip(("h0", "p", "q"), grads, grads_ref):
        assert rel(g, g_ref) < 1e-10, name


@pytest.fixture
def force_fallback(monkeypatch):
    set_switch(monkeypatch, FALLBACK_ENV, "1")


# ---------------------------------------------------------------------------------------------
# The fallback path (tile buffers in global memory)

@pytest.mark.parametrize("kind", ["inner", "outer"])
def test_fallback_large_shape(kind):
    # F=200, D=64: the backward's on-chip tile does not fit any GPU's shared memory.
    check_float64(kind, B=5, F=200, D=64, L=2)


def test_fallback_large_shape_kernel():
    # Kernel weights at F=200, D=64 are 1.3 GB per layer in float64; D=64 with F=40 already
    # exceeds shared memory (one row of W is 40 * 64 * 64 * 8 bytes = 1.3 MB).
    check_float64("kernel", B=3, F=40, D=64, L=2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 5, 3, 2), (33, 13, 8, 3), (4, 6, 2, 0)])
def test_forced_fallback_matches_reference(kind, shape, force_fallback):
    check_float64(kind, *shape)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_and_fallback_agree(kind, monkeypatch):
    h0, p, q = make_inputs(kind, 300, 11, 8, 3, dtype=torch.float32)
    gs = torch.randn(300, 4, 11, device="cuda")
    fast = dagfm_ext.dagfm_propagate(h0, p, q, kind)
    fast_g = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind)
    set_switch(monkeypatch, FALLBACK_ENV, "1")
    slow = dagfm_ext.dagfm_propagate(h0, p, q, kind)
    slow_g = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind)
    assert rel(fast, slow) < 1e-5
    for a, b in zip(fast_g, slow_g):
        if a.numel():
            assert rel(a, b) < 1e-5


# ---------------------------------------------------------------------------------------------
# Shapes: awkward, empty, large

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 2, 1, 5), (129, 39, 16, 3), (17, 23, 5, 1), (2, 8, 33, 2)])
def test_awkward_shapes(kind, shape):
    check_float64(kind, *shape)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(kind):
    h0, p, q = make_inputs(kind, 0, 5, 4, 2, dtype=torch.float32)
    s = dagfm_ext.dagfm_propagate(h0, p, q, kind)
    assert s.shape == (0, 3, 5) and s.is_cuda
    gs = torch.empty(0, 3, 5, device="cuda")
    g_h0, g_p, g_q = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind)
    assert g_h0.shape == h0.shape and g_p.shape == p.shape
    assert (g_p == 0).all()
    assert g_q.shape == (q.shape if q is not None else (0,))
    if q is not None:
        assert (g_q == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_large_batch_float32(kind):
    # More tiles than resident blocks (each block loops over tiles) and a ragged last tile.
    B, F, D, L = 65536 + 3, 39, 16, 3
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=torch.float32, requires_grad=True, seed=1)
    gs = torch.randn(B, L + 1, F, device="cuda")
    s, grads = run(kind, h0, p, q, gs)
    s_ref, grads_ref = run_reference(kind, h0, p, q, gs)
    # Float32 reference on the same inputs, for the error it makes itself.
    h32, p32 = h0.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    q32 = q.detach().clone().requires_grad_() if q is not None else None
    s32 = reference.dagfm_propagate(h32, p32, q32, kind)
    grads32 = torch.autograd.grad(s32, [t for t in (h32, p32, q32) if t is not None], gs)
    assert rel(s, s_ref) <= 2 * rel(s32, s_ref) + 1e-6
    for name, g, g32, g_ref in zip(("h0", "p", "q"), grads, grads32, grads_ref):
        assert rel(g, g_ref) <= 2 * rel(g32, g_ref) + 1e-6, name


# ---------------------------------------------------------------------------------------------
# Determinism, streams, the upper-triangle contract, output coverage

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fallback", [False, True])
def test_gradients_bit_identical_across_runs(kind, fallback, monkeypatch):
    if fallback:
        set_switch(monkeypatch, FALLBACK_ENV, "1")
    B, F, D, L = 4099, 39, 16, 3
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=torch.float32, seed=2)
    gs = torch.randn(B, L + 1, F, device="cuda")
    first = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind)
    second = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_non_default_stream(kind):
    B, F, D, L = 2048, 39, 16, 3
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=torch.float32, seed=3)
    gs = torch.randn(B, L + 1, F, device="cuda")
    expect_s = dagfm_ext.dagfm_propagate(h0, p, q, kind)
    expect_g = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Keep the side stream busy first: a launch on the wrong stream would race with this.
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(1_000_000)
        s = dagfm_ext.dagfm_propagate(h0, p, q, kind)
        g = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(s, expect_s)
    for a, b in zip(g, expect_g):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fallback", [False, True])
def test_lower_triangle_never_read_and_grad_zero(kind, fallback, monkeypatch):
    if fallback:
        set_switch(monkeypatch, FALLBACK_ENV, "1")
    B, F, D, L = 37, 9, 4, 2
    h0, p, q = make_inputs(kind, B, F, D, L, seed=4)
    lower = torch.ones(F, F, dtype=torch.bool, device="cuda").tril(-1)
    shape = (1, F, F) + (1,) * (p.dim() - 3)
    p_nan = p.masked_fill(lower.view(shape), float("nan"))
    q_nan = q.masked_fill(lower.view(1, F, F, 1), float("nan")) if q is not None else None
    gs = torch.randn(B, L + 1, F, dtype=torch.float64, device="cuda")
    s = dagfm_ext.dagfm_propagate(h0, p_nan, q_nan, kind)
    assert rel(s, reference.dagfm_propagate(h0, p, q, kind)) < 1e-10
    _, g_p, g_q = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p_nan, q_nan, kind)
    assert (g_p[lower.view(shape).expand_as(g_p)] == 0).all()
    if q is not None:
        assert (g_q[lower.view(1, F, F, 1).expand_as(g_q)] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fallback", [False, True])
def test_every_output_element_written(kind, fallback, monkeypatch):
    # Fill the caching allocator's blocks with NaN first: an unwritten output element shows.
    if fallback:
        set_switch(monkeypatch, FALLBACK_ENV, "1")
    B, F, D, L = 1000, 13, 8, 3
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=torch.float32, seed=5)
    gs = torch.randn(B, L + 1, F, device="cuda")
    for _ in range(2):
        junk = [torch.full((n,), float("nan"), device="cuda") for n in (B * (L + 1) * F, B * F * D, p.numel())]
        del junk
        s = dagfm_ext.dagfm_propagate(h0, p, q, kind)
        g = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind)
        assert torch.isfinite(s).all()
        for t in g:
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_capture_and_replay(kind, restore_matmul_precision):
    # CUDA-graph friendliness: forward and forward+backward capture (no host
    # synchronisation, workspaces from the caching allocator's graph pool) and replays give the
    # eager results for new inputs copied into the captured buffers.
    torch.set_float32_matmul_precision("highest")
    B, F, D, L = 1024, 39, 16, 3
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=torch.float32, requires_grad=True, seed=12)
    leaves = [t for t in (h0, p, q) if t is not None]
    gs = torch.randn(B, L + 1, F, device="cuda")

    def step():
        s = dagfm_ext.dagfm_propagate(h0, p, q, kind)
        return (s, *torch.autograd.grad(s, leaves, gs))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the graph (allocator, lazy init)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh = make_inputs(kind, B, F, D, L, dtype=torch.float32, seed=13)
    with torch.no_grad():
        for dst, src in zip(leaves, [t for t in fresh if t is not None]):
            dst.copy_(src)
        gs.copy_(torch.randn_like(gs))
    graph.replay()
    torch.cuda.synchronize()
    expect = step()
    # Our kernels replay bit for bit; cuBLAS (the outer / kernel backward) may pick another
    # algorithm under capture, hence a tolerance rather than equality for the gradients.
    assert torch.equal(captured[0], expect[0])
    for got, want in zip(captured[1:], expect[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_other_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    h0, p, q = make_inputs("inner", 64, 7, 4, 2, device="cuda:1")
    s = dagfm_ext.dagfm_propagate(h0, p, q, "inner")
    assert s.device == h0.device
    assert rel(s, reference.dagfm_propagate(h0, p, q, "inner")) < 1e-10


# ---------------------------------------------------------------------------------------------
# The register-blocked algorithms (csrc/cuda/register_blocked_*.cuh). The default where they fit;
# DAGFM_CUDA_REGISTER_BLOCKING=0 keeps the one-output-per-thread kernels, DAGFM_CUDA_RB_TILE pins the
# tile, DAGFM_CUDA_GEMM_BACKWARD=0 turns the kernel and outer GEMM backward off.

RB_ENV = "DAGFM_CUDA_REGISTER_BLOCKING"
RB_TILE_ENV = "DAGFM_CUDA_RB_TILE"
GEMM_ENV = "DAGFM_CUDA_GEMM_BACKWARD"


def cuda_kernel_names(fn):
    """Names of the CUDA kernels that fn launches (so a test knows which path ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def launched(names, kernel):
    """kernel ("rb::forward_inner_outer", "propagate_fwd_kernel") among names, demangled or not."""
    mangled = "".join(f"{len(part)}{part}" for part in kernel.split("::"))
    return any(kernel in n or mangled in n for n in names)


def big_shared_memory():
    # The shapes in these tests fit the register-blocked layout with an H100/H200's 227 KB per block.
    props = torch.cuda.get_device_properties(0)
    return getattr(props, "shared_memory_per_block_optin", 0) >= 200 * 1024


RB_KERNEL = {"inner": "rb::forward_inner_outer", "outer": "rb::forward_inner_outer",
             "kernel": "rb::forward_kernel_interaction"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("enabled", [True, False])
def test_register_blocked_forward_is_the_default_and_can_be_turned_off(kind, enabled, monkeypatch,
                                                                       restore_matmul_precision):
    # Exact float32 (no TF32): the kernel interaction's register-blocked forward, not tensor cores.
    if not big_shared_memory():
        pytest.skip("the F=39, D=16 tile needs about 165 KB of shared memory per block")
    torch.set_float32_matmul_precision("highest")
    if not enabled:
        set_switch(monkeypatch, RB_ENV, "0")
    h0, p, q = make_inputs(kind, 300, 39, 16, 3, dtype=torch.float32, seed=6)
    names = cuda_kernel_names(lambda: dagfm_ext.dagfm_propagate(h0, p, q, kind))
    assert launched(names, RB_KERNEL[kind]) == enabled, names
    assert launched(names, "propagate_fwd_kernel") == (not enabled), names


@pytest.mark.parametrize("kind", ["inner", "outer"])
@pytest.mark.parametrize("tile", ["8", "16", "32"])
@pytest.mark.parametrize(
    "shape, dtype",
    [((1, 1, 1, 1), torch.float64), ((7, 5, 3, 2), torch.float64), ((33, 13, 8, 3), torch.float64),
     ((70, 23, 8, 3), torch.float64), ((41, 80, 3, 2), torch.float64), ((9, 4, 17, 1), torch.float64),
     ((5, 6, 2, 0), torch.float64), ((70, 39, 16, 3), torch.float32)],
)
def test_register_blocked_forward_every_tile(kind, tile, shape, dtype, monkeypatch):
    # Against the float64 reference; awkward F and D (not multiples of 4), partial tiles, F > 64,
    # several weight chunks; the shape in float32 (its float64 tile does not fit on chip).
    set_switch(monkeypatch, RB_TILE_ENV, tile)
    h0, p, q = make_inputs(kind, *shape, dtype=dtype, seed=7)
    out = []
    names = cuda_kernel_names(lambda: out.append(dagfm_ext.dagfm_propagate(h0, p, q, kind)))
    if big_shared_memory():
        assert launched(names, "rb::forward_inner_outer"), names
    ref = reference.dagfm_propagate(*(t.double() if t is not None else None for t in (h0, p, q)), kind)
    assert rel(out[0], ref) < (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("tile", ["8", "16", "32", "64"])
@pytest.mark.parametrize(
    "shape, dtype",
    [((1, 1, 4, 1), torch.float64), ((7, 5, 8, 2), torch.float64), ((33, 13, 8, 3), torch.float64),
     ((70, 9, 12, 1), torch.float64), ((41, 40, 4, 2), torch.float64), ((5, 6, 4, 0), torch.float64),
     ((70, 39, 16, 3), torch.float32)],
)
def test_register_blocked_kernel_interaction_every_tile(tile, shape, dtype, monkeypatch, restore_matmul_precision):
    # Column blocks of several fields (D = 4, 8, 12) and of one field, F > 32, partial tiles.
    torch.set_float32_matmul_precision("highest")
    set_switch(monkeypatch, RB_TILE_ENV, tile)
    h0, p, q = make_inputs("kernel", *shape, dtype=dtype, seed=10)
    out = []
    names = cuda_kernel_names(lambda: out.append(dagfm_ext.dagfm_propagate(h0, p, q, "kernel")))
    if big_shared_memory():
        assert launched(names, RB_KERNEL["kernel"]), names
    ref = reference.dagfm_propagate(h0.double(), p.double(), None, "kernel")
    assert rel(out[0], ref) < (1e-10 if dtype == torch.float64 else 1e-5)


def test_register_blocked_kernel_interaction_needs_d_multiple_of_4(restore_matmul_precision):
    torch.set_float32_matmul_precision("highest")
    h0, p, q = make_inputs("kernel", 50, 7, 6, 2, seed=11)
    out = []
    names = cuda_kernel_names(lambda: out.append(dagfm_ext.dagfm_propagate(h0, p, q, "kernel")))
    assert not launched(names, RB_KERNEL["kernel"]) and launched(names, "propagate_fwd_kernel"), names
    assert rel(out[0], reference.dagfm_propagate(h0, p, q, "kernel")) < 1e-10


def train_grads(kind, h0, p, q, gs):
    """Gradients through the training path (the forward keeps the messages, the backward reads them)."""
    leaves = [t.detach().clone().requires_grad_() for t in (h0, p, q) if t is not None]
    s = dagfm_ext.dagfm_propagate(leaves[0], leaves[1], leaves[2] if q is not None else None, kind)
    return torch.autograd.grad(s, leaves, gs)


@pytest.mark.parametrize(
    "shape, dtype",
    [((1, 1, 1, 1), torch.float64), ((7, 5, 3, 2), torch.float64), ((33, 13, 8, 3), torch.float64),
     ((70, 4, 17, 1), torch.float64), ((41, 39, 4, 2), torch.float64), ((1000, 39, 16, 3), torch.float32)],
)
def test_register_blocked_inner_backward(shape, dtype):
    # The layer-major inner backward (needs the saved messages) against the float64 reference, and
    # proof that it ran.
    B, F, D, L = shape
    h0, p, _ = make_inputs("inner", B, F, D, L, dtype=dtype, seed=14)
    gs = torch.randn(B, L + 1, F, dtype=dtype, device="cuda")
    out = []
    names = cuda_kernel_names(lambda: out.append(train_grads("inner", h0, p, None, gs)))
    if big_shared_memory():
        assert launched(names, "rb::backward_inner"), names
    _, ref = run_reference("inner", h0, p, None, gs)
    for name, g, g_ref in zip(("h0", "p"), out[0], ref):
        assert rel(g, g_ref) < (1e-10 if dtype == torch.float64 else 1e-5), name


@pytest.mark.parametrize("kind", ["kernel", "outer"])
@pytest.mark.parametrize("shape, dtype", [((7, 5, 4, 2), torch.float64), ((1000, 39, 16, 3), torch.float32)])
def test_training_backward_is_gemm(kind, shape, dtype, monkeypatch, restore_matmul_precision):
    # With the messages kept, the kernel and outer backwards run as cuBLAS products, not the
    # CUDA-core backward kernel; exact float32 here (no TF32).
    torch.set_float32_matmul_precision("highest")
    B, F, D, L = shape
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=dtype, seed=16)
    gs = torch.randn(B, L + 1, F, dtype=dtype, device="cuda")
    out = []
    names = cuda_kernel_names(lambda: out.append(train_grads(kind, h0, p, q, gs)))
    assert not launched(names, "propagate_bwd_kernel"), names
    _, ref = run_reference(kind, h0, p, q, gs)
    for name, g, g_ref in zip(("h0", "p", "q"), out[0], ref):
        assert rel(g, g_ref) < (1e-10 if dtype == torch.float64 else 1e-5), name
    set_switch(monkeypatch, GEMM_ENV, "0")
    names = cuda_kernel_names(lambda: train_grads(kind, h0, p, q, gs))
    assert launched(names, "propagate_bwd_kernel"), names


def test_register_blocked_inner_backward_bit_identical_and_off_switch(monkeypatch):
    B, F, D, L = 4099, 39, 16, 3
    h0, p, _ = make_inputs("inner", B, F, D, L, dtype=torch.float32, seed=15)
    gs = torch.randn(B, L + 1, F, device="cuda")
    first, second = train_grads("inner", h0, p, None, gs), train_grads("inner", h0, p, None, gs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    set_switch(monkeypatch, RB_ENV, "0")
    names = cuda_kernel_names(lambda: train_grads("inner", h0, p, None, gs))
    assert not launched(names, "rb::backward_inner") and launched(names, "propagate_bwd_kernel"), names
    for a, b in zip(first, train_grads("inner", h0, p, None, gs)):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 1, 4, 1), (129, 39, 16, 3), (17, 23, 5, 1)])
def test_first_forward_kernels_still_right(kind, shape, monkeypatch):
    # With register blocking off the staged first kernels run the forward (and still serve shapes
    # whose tiles do not fit the register-blocked layout).
    set_switch(monkeypatch, RB_ENV, "0")
    h0, p, q = make_inputs(kind, *shape, seed=8)
    assert rel(dagfm_ext.dagfm_propagate(h0, p, q, kind), reference.dagfm_propagate(h0, p, q, kind)) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_register_blocked_and_first_kernels_agree(kind, dtype, monkeypatch, restore_matmul_precision):
    # (float16 / bfloat16 kernel interaction: tensor cores off, so both sides are CUDA cores.)
    torch.set_float32_matmul_precision("highest")
    set_switch(monkeypatch, TC_ENV, "0")
    B, F, D, L = 4099, 39, 16, 3
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=dtype, seed=9)
    fast = dagfm_ext.dagfm_propagate(h0, p, q, kind)
    set_switch(monkeypatch, RB_ENV, "0")
    first = dagfm_ext.dagfm_propagate(h0, p, q, kind)
    assert rel(fast, first) < (1e-5 if dtype == torch.float32 else 2e-2)


# ---------------------------------------------------------------------------------------------
# float16 / bfloat16 (float accumulation) and the tensor-core forward of the kernel interaction
# (float16 / bfloat16 always, float32 when the matmul precision allows TF32). The precision rule:
# within twice the reference's own error in the same low precision on the same device, both
# measured against float64 (docs/maths.md; the precision rule in tests/conftest.py).

LOW = (torch.float16, torch.bfloat16)
TC_ENV = "DAGFM_CUDA_TENSOR_CORES"


def low_precision_case(kind, B, F, D, L, dtype, seed=0):
    """Values and gradients of the fused op in `dtype`, of the reference in `dtype`, and of the
    reference in float64, on the same inputs (rounded to `dtype` first)."""
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=dtype, seed=seed)
    gs = torch.randn(B, L + 1, F, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).to(dtype)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (h0, p, q)]
    s, grads = run(kind, *leaves, gs)
    lo = [t.detach().clone().requires_grad_() if t is not None else None for t in (h0, p, q)]
    s_lo = reference.dagfm_propagate(lo[0], lo[1], lo[2], kind)
    grads_lo = torch.autograd.grad(s_lo, [t for t in lo if t is not None], gs)
    s64, grads64 = run_reference(kind, h0, p, q, gs)
    return (s, grads), (s_lo, grads_lo), (s64, grads64)


def assert_within_twice_reference(ours, ref_lo, ref64, what):
    assert ours.dtype == ref_lo.dtype, what
    e, e_ref = rel(ours, ref64), rel(ref_lo, ref64)
    # The small absolute slack covers outputs the low-precision reference happens to get nearly exact.
    assert e <= 2 * e_ref + 1e-4, f"{what}: error {e:.3g} vs the {ours.dtype} reference's own {e_ref:.3g}"


@pytest.mark.parametrize("tensor_cores", ["1", "0"])
@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(257, 39, 16, 3), (100, 23, 32, 2), (37, 8, 8, 3), (19, 5, 48, 1), (40, 6, 64, 2)])
def test_low_precision_within_twice_the_reference_error(kind, shape, dtype, tensor_cores, monkeypatch):
    if tensor_cores == "0" and kind != "kernel":
        pytest.skip("the switch only affects the kernel interaction")
    set_switch(monkeypatch, TC_ENV, tensor_cores)
    (s, grads), (s_lo, grads_lo), (s64, grads64) = low_precision_case(kind, *shape, dtype)
    assert s.dtype == dtype and s.shape == s64.shape
    assert_within_twice_reference(s, s_lo, s64, "states")
    for name, g, g_lo, g64 in zip(("h0", "p", "q"), grads, grads_lo, grads64):
        assert g.dtype == dtype
        assert_within_twice_reference(g, g_lo, g64, f"grad {name}")


@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_fallback_path(kind, dtype, force_fallback):
    (s, grads), (s_lo, grads_lo), (s64, grads64) = low_precision_case(kind, 33, 13, 16, 3, dtype, seed=7)
    assert_within_twice_reference(s, s_lo, s64, "states")
    for name, g, g_lo, g64 in zip(("h0", "p", "q"), grads, grads_lo, grads64):
        assert_within_twice_reference(g, g_lo, g64, f"grad {name}")


@pytest.mark.parametrize("dtype", LOW, ids=["float16", "bfloat16"])
def test_low_precision_large_batch_kernel(dtype):
    # The tensor-core forward with many more warp tiles than resident warps and a ragged last tile.
    B, F, D, L = 65536 + 3, 39, 16, 3
    h0, p, _ = make_inputs("kernel", B, F, D, L, dtype=dtype, seed=8)
    s = dagfm_ext.dagfm_propagate(h0, p, None, "kernel")
    s_lo = reference.dagfm_propagate(h0, p, None, "kernel")
    s64 = reference.dagfm_propagate(h0.double(), p.double(), None, "kernel")
    assert_within_twice_reference(s, s_lo, s64, "states")


@pytest.mark.parametrize("dtype", LOW + (torch.float32,), ids=["float16", "bfloat16", "tf32"])
def test_tensor_core_forward_poisoned_outputs_and_lower_triangle(dtype, restore_matmul_precision):
    # NaN below the diagonal of W must never be read; every state must be written (the output is
    # allocated into blocks that held NaN just before); results are deterministic.
    if dtype == torch.float32:
        torch.set_float32_matmul_precision("high")
    B, F, D, L = 1000, 13, 16, 3
    h0, p, _ = make_inputs("kernel", B, F, D, L, dtype=dtype, seed=9)
    lower = torch.ones(F, F, dtype=torch.bool, device="cuda").tril(-1).view(1, F, F, 1, 1)
    p_nan = p.masked_fill(lower, float("nan"))
    for _ in range(2):
        junk = torch.full((B * (L + 1) * F,), float("nan"), device="cuda", dtype=dtype)
        del junk
        s = dagfm_ext.dagfm_propagate(h0, p_nan, None, "kernel")
        assert torch.isfinite(s).all()
    assert torch.equal(s, dagfm_ext.dagfm_propagate(h0, p_nan, None, "kernel"))
    s64 = reference.dagfm_propagate(h0.double(), p.double(), None, "kernel")
    assert rel(s, s64) < (3e-3 if dtype == torch.float32 else 5e-2)


@pytest.fixture
def restore_matmul_precision():
    # Restored through the legacy setter first (it makes the legacy and the per-backend settings
    # agree again), then the per-backend value.
    legacy, per_backend = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision
    yield
    torch.set_float32_matmul_precision(legacy)
    torch.backends.cuda.matmul.fp32_precision = per_backend


@pytest.mark.parametrize("precision", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("shape", [(257, 39, 16, 3), (100, 23, 32, 2), (65, 7, 64, 2), (33, 5, 16, 1)])
def test_tensor_core_forward_with_two_row_tiles_per_warp(precision, shape, monkeypatch, restore_matmul_precision):
    # DAGFM_CUDA_TC_ROWS=32 (a variant for measurement): the same results as 16 rows per warp, to
    # rounding; D = 64 keeps 16 rows (the planner falls back) and still runs on tensor cores.
    B, F, D, L = shape
    dtype = torch.float32 if precision == "tf32" else getattr(torch, precision)
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    h0, p, _ = make_inputs("kernel", B, F, D, L, dtype=dtype, seed=17)
    one = dagfm_ext.dagfm_propagate(h0, p, None, "kernel")
    set_switch(monkeypatch, "DAGFM_CUDA_TC_ROWS", "32")
    out = []
    names = cuda_kernel_names(lambda: out.append(dagfm_ext.dagfm_propagate(h0, p, None, "kernel")))
    assert launched(names, "tc::forward_kernel_interaction"), names
    s64 = reference.dagfm_propagate(h0.double(), p.double(), None, "kernel")
    assert rel(out[0], s64) <= 2 * rel(one, s64) + 1e-6


@pytest.mark.parametrize("shape", [(257, 39, 16, 3), (100, 23, 32, 2), (65, 7, 64, 2)])
def test_tf32_kernel_forward_follows_matmul_precision(shape, restore_matmul_precision):
    B, F, D, L = shape
    h0, p, _ = make_inputs("kernel", B, F, D, L, dtype=torch.float32, seed=10)
    gs = torch.randn(B, L + 1, F, device="cuda")
    s64, _ = run_reference("kernel", h0, p, None, gs)
    torch.set_float32_matmul_precision("highest")
    exact = dagfm_ext.dagfm_propagate(h0, p, None, "kernel")
    assert rel(exact, s64) < 1e-5
    torch.set_float32_matmul_precision("high")  # TF32 allowed: the tensor-core forward
    fast = dagfm_ext.dagfm_propagate(h0, p, None, "kernel")
    ref_tf32 = reference.dagfm_propagate(h0, p, None, "kernel")  # torch's own matmuls in TF32
    e, e_ref = rel(fast, s64), rel(ref_tf32, s64)
    assert e < 1e-2, e
    assert rel(fast, exact) > 1e-7, "TF32 allowed, yet the result is the exact float32 one"
    assert e <= 2 * max(e_ref, 3e-4) + 1e-5, (e, e_ref)
    # The setting is read per call, through either API.
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert torch.equal(dagfm_ext.dagfm_propagate(h0, p, None, "kernel"), exact)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert torch.equal(dagfm_ext.dagfm_propagate(h0, p, None, "kernel"), fast)


def test_tf32_leaves_other_paths_exact(restore_matmul_precision):
    # TF32 only changes the kernel interaction's forward; the backward and inner/outer stay exact.
    torch.set_float32_matmul_precision("high")
    for kind in KINDS:
        h0, p, q = make_inputs(kind, 129, 39, 16, 3, dtype=torch.float32, requires_grad=True, seed=11)
        gs = torch.randn(129, 4, 39, device="cuda")
        g = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind)
        _, g64 = run_reference(kind, h0, p, q, gs)
        for a, b in zip(g, g64):
            assert rel(a, b) < 1e-5, kind
        if kind != "kernel":
            s = dagfm_ext.dagfm_propagate(h0, p, q, kind)
            s64, _ = run_reference(kind, h0, p, q, gs)
            assert rel(s, s64) < 1e-5, kind


def test_tf32_misaligned_weights_take_the_exact_path(restore_matmul_precision):
    # A weight view that is not 32-byte aligned cannot feed WMMA loads: the CUDA-core kernel runs.
    torch.set_float32_matmul_precision("high")
    B, F, D, L = 64, 5, 16, 1
    h0, p, _ = make_inputs("kernel", B, F, D, L, dtype=torch.float32, seed=12)
    flat = torch.empty(p.numel() + 1, device="cuda")
    p_off = flat[1:].view_as(p)
    p_off.copy_(p)
    assert p_off.data_ptr() % 32 != 0
    s = dagfm_ext.dagfm_propagate(h0, p_off, None, "kernel")
    s64 = reference.dagfm_propagate(h0.double(), p.double(), None, "kernel")
    assert rel(s, s64) < 1e-5


# ---------------------------------------------------------------------------------------------
# The second output z = h^0 + ... + h^L (dagfm_propagate_with_sum) on every backward path, and the
# ops under torch.autocast (float16 / bfloat16 run natively on CUDA)

def sum_case(kind, h0, p, q, gs, gz, fn):
    """z, states and the gradients of <states, gs> + <z, gz> through fn (fused or reference)."""
    leaves = [t.detach().clone().requires_grad_() for t in (h0, p, q) if t is not None]
    s, z = fn(leaves[0], leaves[1], leaves[2] if q is not None else None, kind)
    return s, z, torch.autograd.grad([s, z], leaves, [gs, gz])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (33, 13, 8, 3), (129, 39, 16, 3), (5, 70, 3, 2), (41, 39, 4, 2)])
@pytest.mark.parametrize("path", ["default", "fallback", "first_kernels"])
def test_sum_output_matches_reference_on_every_path(kind, shape, path, monkeypatch):
    # default: register-blocked inner backward / cuBLAS backward of kernel and outer (the messages
    # kept); first_kernels: the CUDA-core backward reading the messages; fallback: global memory.
    if path == "fallback":
        monkeypatch.setenv(FALLBACK_ENV, "1")
    elif path == "first_kernels":
        monkeypatch.setenv(RB_ENV, "0")
    B, F, D, L = shape
    h0, p, q = make_inputs(kind, B, F, D, L, seed=21)
    gs = torch.randn(B, L + 1, F, dtype=torch.float64, device="cuda")
    gz = torch.randn(B, F, D, dtype=torch.float64, device="cuda")
    s, z, grads = sum_case(kind, h0, p, q, gs, gz, dagfm_ext.dagfm_propagate_with_sum)
    s_ref, z_ref, grads_ref = sum_case(kind, h0, p, q, gs, gz, reference.dagfm_propagate_with_sum)
    assert rel(s, s_ref) < 1e-10 and rel(z, z_ref) < 1e-10
    for name, g, g_ref in zip(("h0", "p", "q"), grads, grads_ref):
        assert rel(g, g_ref) < 1e-10, name
    # Without the kept messages the backward recomputes them (the CUDA-core kernel).
    recomputed = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind, None, gz)
    for name, g, g_ref in zip(("h0", "p", "q"), recomputed, grads_ref):
        if g_ref.numel():
            assert rel(g, g_ref) < 1e-10, name


@pytest.mark.parametrize("kind", KINDS)
def test_sum_output_large_batch_float32(kind, restore_matmul_precision):
    torch.set_float32_matmul_precision("highest")
    B, F, D, L = 65536 + 3, 39, 16, 3
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=torch.float32, seed=22)
    gs = torch.randn(B, L + 1, F, device="cuda")
    gz = torch.randn(B, F, D, device="cuda")
    s, z, grads = sum_case(kind, h0, p, q, gs, gz, dagfm_ext.dagfm_propagate_with_sum)
    _, z_ref, grads_ref = sum_case(kind, h0.double(), p.double(), None if q is None else q.double(),
                                   gs.double(), gz.double(), reference.dagfm_propagate_with_sum)
    assert rel(z, z_ref) < 1e-5
    for name, g, g_ref in zip(("h0", "p", "q"), grads, grads_ref):
        assert rel(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_runs_the_ops_natively_in_16_bits(kind, dtype):
    from dagfm_ext.modules import DAGFM, DAGFMPlus

    h0, p, q = make_inputs(kind, 64, 9, 16, 2, dtype=torch.float32, seed=23)
    with torch.autocast("cuda", dtype=dtype):
        assert dagfm_ext.dagfm_propagate(h0, p, q, kind).dtype == dtype
        assert torch.ops.dagfm_ext.propagate_fwd(h0, p, q, kind).dtype == dtype
        assert all(t.dtype == dtype for t in dagfm_ext.dagfm_propagate_with_sum(h0, p, q, kind))
    # A model forward and backward under autocast against float32, within the 16-bit type's error.
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    for cls in (DAGFM, DAGFMPlus):
        torch.manual_seed(24)
        model = cls(39, 16, 3, kind).cuda()
        emb = torch.randn(512, 39, 16, device="cuda")

        def forward_backward():
            x = emb.clone().requires_grad_()
            out = model(x)
            grads = torch.autograd.grad(out.float().square().sum(), [x, *model.parameters()])
            return out.float(), grads

        out32, grads32 = forward_backward()
        with torch.autocast("cuda", dtype=dtype):
            out16, grads16 = forward_backward()
        assert rel(out16, out32) < tol, cls.__name__
        for (name, _), a, b in zip([("emb", None), *model.named_parameters()], grads16, grads32):
            assert a.dtype == torch.float32 and rel(a, b) < tol, (cls.__name__, name)


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_pipeline_precisions_on_cuda(precision, tmp_path, restore_matmul_precision):
    from dagfm_ext.distill import Pipeline, RunConfig

    cfg = RunConfig(dataset="synthetic", synthetic_size=3000, student="dagfm+", embed_dim=8, depth=2,
                    teacher_depth=2, batch_size=256, max_epochs=2, patience=1, device="cuda",
                    progress=False, precision=precision, output=str(tmp_path / precision))
    report = Pipeline(cfg).run()
    assert report["student"]["test_auc"] > 0.5 and report["teacher"]["test_auc"] > 0.5
    from dagfm_ext.checkpoint import read_checkpoint
    scaler = read_checkpoint(tmp_path / precision / "checkpoint.pt")["scaler"]
    assert (scaler is not None and scaler["scale"] > 0) == (precision == "fp16")

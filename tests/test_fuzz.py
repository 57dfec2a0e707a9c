"""Property-based search for inputs on which the fused op and the reference disagree.

Hypothesis draws the interaction, the shape (empty batch included), the dtype, the memory layout
of every input (permuted, strided, offset, stride-0 expanded), magnitudes from tiny to huge, and
exact zeros (whole batch rows, fields, edges); the fused op's states and gradients of h0, p and q
must match the reference's. The profile sets how many cases: "ci" by default, "long" with
``pytest --hypothesis-profile=long``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import assume, given, strategies as st

from dagfm_ext.testing import make_grad_states, make_inputs, rel_err, weight_shape

from conftest import (DEVICES, INTERACTIONS, assert_error_within_tolerance, dtypes_on, fused_and_reference,
                      lower_triangle)

# Size limits that keep an example to a few milliseconds on a CPU core.
MAX_B, MAX_F, MAX_D, MAX_L = 64, 70, 40, 5
MAX_WEIGHTS = 40_000    # elements of p
MAX_WORK = 300_000      # B * elements of p, about the reference's multiply-adds per layer

# Powers of ten the inputs are scaled by, and a bound on the deepest state's magnitude (about
# h0^(L+1) p^L q^L), so that no exact value overflows or leaves the normal range.
MAX_EXPONENT = {torch.float64: 20, torch.float32: 3}
MAX_STATE_EXPONENT = {torch.float64: 250, torch.float32: 25}
LOUD_LOWER_TRIANGLE = 1e6   # makes any read of the unused edges i > j show in the result


@dataclass
class Layout:
    """How a tensor sits in memory: its dims stored in ``order`` (outermost first), every
    ``step``-th element of a larger NaN-filled buffer at offset 1, stride 0 along ``expanded``."""
    order: tuple
    step: tuple
    expanded: tuple


@dataclass
class Case:
    interaction: str
    dtype: torch.dtype
    device: str
    B: int
    F: int
    D: int
    L: int
    seed: int
    exponents: tuple          # powers of ten for h0, p, q
    zero_rows: tuple          # batch rows of h0 set to zero
    zero_fields: tuple        # fields of h0 set to zero in every row
    zero_edges: tuple         # (t, i, j) edges set to zero in p and q
    loud_lower_triangle: bool
    layouts: dict             # input name -> Layout


@st.composite
def layouts(draw, shape):
    dims = len(shape)
    kind = draw(st.sampled_from(["contiguous", "transposed", "channels_last", "permuted", "sliced", "expanded",
                                 "sliced_permuted"]))
    order, step, expanded = tuple(range(dims)), (1,) * dims, ()
    if kind == "transposed":
        a, b = draw(st.lists(st.integers(0, dims - 1), min_size=2, max_size=2, unique=True))
        order = list(order)
        order[a], order[b] = order[b], order[a]
    elif kind == "channels_last":
        order = (0, dims - 1) + tuple(range(1, dims - 1))  # the last dim stored second, like NHWC
    elif kind in ("permuted", "sliced_permuted"):
        order = draw(st.permutations(range(dims)))
    if kind in ("sliced", "sliced_permuted"):
        strided = draw(st.lists(st.integers(0, dims - 1), min_size=1, max_size=2, unique=True))
        step = tuple(draw(st.integers(2, 3)) if d in strided else 1 for d in range(dims))
    if kind == "expanded":
        expanded = tuple(draw(st.lists(st.sampled_from([d for d in range(dims) if shape[d] > 0] or [0]),
                                       min_size=1, max_size=2, unique=True)))
    return Layout(tuple(order), step, expanded)


def lay_out(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``values`` in ``layout`` (an expanded dim repeats the values at index 0 along it)."""
    if values.numel() == 0:
        return values
    target = values.shape
    for d in layout.expanded:
        values = values.narrow(d, 0, 1)
    shape = values.shape
    full = [1 + n * s for n, s in zip(shape, layout.step)]
    buffer = torch.full([full[d] for d in layout.order], float("nan"), dtype=values.dtype, device=values.device)
    view = buffer.permute([layout.order.index(d) for d in range(len(shape))])
    view = view[tuple(slice(1, 1 + n * s, s) for n, s in zip(shape, layout.step))]
    view.copy_(values)
    return view.expand(target)


@st.composite
def cases(draw):
    interaction = draw(st.sampled_from(INTERACTIONS))
    device = draw(st.sampled_from(DEVICES))
    dtype = draw(st.sampled_from([t for t in (torch.float64, torch.float32) if t in dtypes_on(device)]))
    L = draw(st.integers(1, MAX_L))
    F = draw(st.integers(1, MAX_F))
    per_d = L * F * F
    max_D = MAX_WEIGHTS // per_d if interaction != "kernel" else math.isqrt(MAX_WEIGHTS // per_d)
    D = draw(st.integers(1, max(1, min(MAX_D, max_D))))
    weights = math.prod(weight_shape(interaction, L, F, D))
    B = draw(st.integers(0, min(MAX_B, MAX_WORK // weights)))

    top = MAX_EXPONENT[dtype]
    e_h, e_p = draw(st.integers(-top, top)), draw(st.integers(-top, top))
    e_q = draw(st.integers(-top, top)) if interaction == "outer" else 0
    assume(abs((L + 1) * e_h + L * (e_p + e_q)) <= MAX_STATE_EXPONENT[dtype])

    zero_rows = tuple(draw(st.lists(st.integers(0, max(B - 1, 0)), max_size=3))) if B else ()
    zero_fields = tuple(draw(st.lists(st.integers(0, F - 1), max_size=min(F, 3))))
    upper = st.tuples(st.integers(0, L - 1), st.integers(0, F - 1), st.integers(0, F - 1)).map(
        lambda e: (e[0], min(e[1], e[2]), max(e[1], e[2])))
    zero_edges = tuple(draw(st.lists(upper, max_size=4)))

    shapes = {"h0": (B, F, D), "p": weight_shape(interaction, L, F, D), "grad_states": (B, L + 1, F)}
    if interaction == "outer":
        shapes["q"] = (L, F, F, D)
    return Case(interaction, dtype, device, B, F, D, L, draw(st.integers(0, 2**32 - 1)), (e_h, e_p, e_q),
                zero_rows, zero_fields, zero_edges, draw(st.booleans()),
                {name: draw(layouts(shape)) for name, shape in shapes.items()})


def build_inputs(case: Case):
    """h0, p, q and the upstream gradient for ``case``, in its dtype, values and layouts."""
    h0, p, q = make_inputs(case.interaction, case.B, case.F, case.D, case.L, seed=case.seed)
    grad_states = make_grad_states(case.B, case.F, case.L, seed=case.seed + 1)
    e_h, e_p, e_q = case.exponents
    h0 = h0 * 10.0 ** e_h
    h0[list(case.zero_rows)] = 0
    h0[:, list(case.zero_fields)] = 0
    lower = lower_triangle(case.F, "cpu")
    weights = {"p": p * 10.0 ** e_p, "q": None if q is None else q * 10.0 ** e_q}
    for name, w in weights.items():
        if w is None:
            continue
        for t, i, j in case.zero_edges:
            w[t, i, j] = 0
        # Expanded along a field dim, an upper edge would alias a loud lower one.
        if case.loud_lower_triangle and not {1, 2} & set(case.layouts[name].expanded):
            w[:, lower] *= LOUD_LOWER_TRIANGLE
    tensors = {"h0": h0, **weights, "grad_states": grad_states}
    return {name: None if t is None else lay_out(t.to(device=case.device, dtype=case.dtype), case.layouts[name])
            for name, t in tensors.items()}


def assert_close_per_slice(actual, same_dtype_reference, exact, what, layers):
    """Each slice along dim 0 (a layer) against float64, relative to that slice's largest value:
    a layer's magnitude may differ from the next one's by 10^40. A slice that is exactly zero in
    float64 (the zeros in the inputs) must be exactly zero. ``layers(index)``: how many layers
    the slice's values went through."""
    assert actual.shape == exact.shape and actual.dtype == same_dtype_reference.dtype, what
    for index in range(exact.shape[0]):
        a, lo, e = actual[index].double(), same_dtype_reference[index].double(), exact[index]
        if e.numel() == 0:
            continue
        largest = e.abs().max().item()
        if largest == 0:
            assert torch.count_nonzero(a) == 0, f"{what}[{index}]: nonzero where float64 is exactly zero"
            continue
        unit = 2.0 ** -math.frexp(largest)[1]  # a power of two: the rescaling is exact
        reference_err = rel_err(lo * unit, e * unit)
        assert_error_within_tolerance(actual.dtype, rel_err(a * unit, e * unit), reference_err, f"{what}[{index}]",
                                      layers(index))


@given(case=cases())
def test_fused_matches_reference(case):
    inputs = build_inputs(case)
    h0, p, q = inputs["h0"], inputs["p"], inputs["q"]
    (s, g), (s_lo, g_lo), (s64, g64) = fused_and_reference(h0, p, q, case.interaction, inputs["grad_states"])
    assert s.shape == (case.B, case.L + 1, case.F) and s.dtype == case.dtype
    # States t went through t + 1 layers (h0 included); the gradients through all of them and back.
    assert_close_per_slice(s.transpose(0, 1), s_lo.transpose(0, 1), s64.transpose(0, 1), "states",
                           layers=lambda t: t + 1)
    every_layer = lambda _: case.L + 1
    # grad h0 sums over the layers, so the deepest one sets its scale.
    assert_close_per_slice(g[0][None], g_lo[0][None], g64[0][None], "grad h0", every_layer)
    lower = lower_triangle(case.F, case.device)
    for name, a, a_lo, exact in zip(("p", "q"), g[1:], g_lo[1:], g64[1:]):
        assert_close_per_slice(a, a_lo, exact, f"grad {name}", every_layer)
        assert torch.count_nonzero(a[:, lower]) == 0, f"grad {name}: nonzero below the diagonal"
    # A field of h0 that is zero in a row keeps every state of that row and field exactly zero.
    zero = (h0 == 0).all(dim=-1)
    assert torch.count_nonzero(s.transpose(1, 2)[zero]) == 0, "states of zero fields"

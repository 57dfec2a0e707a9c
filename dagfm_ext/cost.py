"""Work and memory traffic of the DAG propagation and of the DAGFM students: the one cost model.

Counts are of the useful maths only: edges i -> j with i <= j (E = F(F+1)/2 per layer), an FMA is
2 FLOPs, a bias add 1. ``shape`` is (B, F, D, L). The passes are those the fused op runs:

* ``fwd``: h^t = h0 * a^t with a^t_j = sum_{i<=j} edge(h^{t-1}_i), and the states s^t_j = sum_d h^t_j.
  Per layer: the edge aggregation (inner 2ED, outer 4ED: c_ij = <h_i, p_ij> then c_ij q_ij,
  kernel 2ED^2), h0 * a (FD) and the state sum (FD); plus the t = 0 state sum (FD).
* ``fwd+bwd``: the training forward (the same FLOPs; it also writes the messages a^1..a^L,
  B*L*F*D values) and the backward on those kept messages, which re-derives no layer product.
  Per layer: the edge work (inner 4ED: dP, delta; outer 10ED: c recomputed from the kept h, r,
  dQ, dP, delta; kernel 4ED^2: dW, delta), alpha = delta * h0 (FD), dh0 += delta * a (2FD) and
  h^{t-1} = h0 * a^{t-1} rebuilt from the kept messages (FD; at t = 1 it is h0, and the final
  dh0 += delta^0 takes that FD instead).

Minimal bytes: every input read once and every output written once per pass, weights as their
upper triangle; ``fwd+bwd`` adds the kept messages written by the forward and read by the backward.
"""
from __future__ import annotations

from typing import Sequence, Tuple

from .reference import INTERACTIONS

__all__ = ["PASSES", "useful_flops", "min_bytes", "weight_elems", "saved_message_elems", "linear_flops",
           "dagfm_flops_per_sample", "dagfm_plus_flops_per_sample"]

PASSES = ("fwd", "fwd+bwd")

Shape = Tuple[int, int, int, int]  # (B, F, D, L)


def _edges(num_fields: int) -> int:
    return num_fields * (num_fields + 1) // 2


def _check(interaction: str, pass_: str = "fwd") -> None:
    if interaction not in INTERACTIONS:
        raise ValueError(f"interaction: expected one of {INTERACTIONS}, got {interaction!r}")
    if pass_ not in PASSES:
        raise ValueError(f"pass_: expected one of {PASSES}, got {pass_!r}")


def _forward_flops_per_layer(F: int, D: int, interaction: str) -> int:
    """Edge aggregation plus h0 * a; the state sum is counted by the caller."""
    per_edge = {"inner": 2 * D, "outer": 4 * D, "kernel": 2 * D * D}[interaction]
    return _edges(F) * per_edge + F * D


def useful_flops(shape: Shape, interaction: str, pass_: str) -> int:
    """FLOPs of one pass of the op over the batch (see the module docstring for what is counted)."""
    _check(interaction, pass_)
    B, F, D, L = shape
    forward = F * D + L * (_forward_flops_per_layer(F, D, interaction) + F * D)
    if pass_ == "fwd":
        return B * forward
    per_edge_bwd = {"inner": 4 * D, "outer": 10 * D, "kernel": 4 * D * D}[interaction]
    backward = L * (_edges(F) * per_edge_bwd + 4 * F * D)
    return B * (forward + backward)


def weight_elems(shape: Shape, interaction: str) -> int:
    """Upper-triangle elements of the weights: p (and q for outer)."""
    _check(interaction)
    _, F, D, L = shape
    return {"inner": L * _edges(F) * D, "outer": 2 * L * _edges(F) * D,
            "kernel": L * _edges(F) * D * D}[interaction]


def saved_message_elems(shape: Shape) -> int:
    """Elements the training forward keeps for the backward: the messages a^1..a^L, B*L*F*D."""
    B, F, D, L = shape
    return B * L * F * D


def min_bytes(shape: Shape, interaction: str, pass_: str, itemsize: int) -> int:
    """Minimal memory traffic of one pass in bytes (``itemsize`` bytes per element)."""
    _check(interaction, pass_)
    B, F, D, L = shape
    w = weight_elems(shape, interaction)
    h0, states = B * F * D, B * (L + 1) * F
    forward = h0 + states + w  # read h0 and the weights, write the states
    if pass_ == "fwd":
        return itemsize * forward
    messages = saved_message_elems(shape)
    # forward also writes the messages; backward reads grad_states, h0, weights and messages and
    # writes dh0 and the weight gradients
    backward = states + h0 + w + messages + h0 + w
    return itemsize * (forward + messages + backward)


def linear_flops(in_features: int, out_features: int) -> int:
    """``nn.Linear`` on one sample: the product (an FMA per weight) and the bias add."""
    return 2 * in_features * out_features + out_features


def _mixing_flops(F: int, D: int) -> int:
    # h0 = C @ x: an (F, F) by (F, D) product per sample
    return 2 * F * F * D


def dagfm_flops_per_sample(num_fields: int, embed_dim: int, depth: int, interaction: str) -> int:
    """DAGFM forward on one sample: field mixing, the propagation (``fwd``), the linear readout."""
    F, D, L = num_fields, embed_dim, depth
    return (_mixing_flops(F, D) + useful_flops((1, F, D, L), interaction, "fwd")
            + linear_flops((L + 1) * F, 1))


def dagfm_plus_flops_per_sample(num_fields: int, embed_dim: int, depth: int, interaction: str,
                                mlp_dims: Sequence[int]) -> int:
    """DAGFM+ forward on one sample: field mixing, the layers with the running sum of the h^t
    (FD each, instead of the state sums), and the MLP on that sum (ReLUs not counted)."""
    _check(interaction)
    F, D, L = num_fields, embed_dim, depth
    dims = [F * D, *mlp_dims, 1]
    mlp = sum(linear_flops(a, b) for a, b in zip(dims[:-1], dims[1:]))
    return _mixing_flops(F, D) + L * (_forward_flops_per_layer(F, D, interaction) + F * D) + mlp

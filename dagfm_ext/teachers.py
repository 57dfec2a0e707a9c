"""Teacher networks for KD-DAGFM, and the registry the pipeline and the CLI choose them from.

Teacher protocol
----------------
A teacher is any ``nn.Module`` whose ``forward(emb)`` maps field embeddings ``emb`` of shape
(B, F, D) to logits of shape (B,) (pre-sigmoid). It must not own the embedding table: the
pipeline shares one table between teacher and student. Optionally it may define
``flops_per_sample() -> int`` (otherwise FLOPs are counted with ``torch.utils.flop_counter``).

To make a user module selectable by name::

    from dagfm_ext.teachers import register_teacher
    register_teacher("mynet", lambda num_fields, embed_dim, **options: MyNet(num_fields, embed_dim))

Names are looked up in a dict; strings are never evaluated.
"""
from __future__ import annotations

from typing import Callable, Dict, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from .cost import linear_flops

__all__ = ["TeacherModule", "CrossNet", "CIN", "FM", "TEACHERS", "register_teacher",
           "build_teacher", "teacher_names"]


@runtime_checkable
class TeacherModule(Protocol):
    """Maps embeddings (B, F, D) to logits (B,)."""

    def __call__(self, emb: torch.Tensor) -> torch.Tensor: ...


def _check_emb(emb: torch.Tensor, num_fields: int, embed_dim: int) -> None:
    if emb.dim() != 3 or emb.shape[1] != num_fields or emb.shape[2] != embed_dim:
        raise ValueError(f"emb: expected shape (B, {num_fields}, {embed_dim}), got {tuple(emb.shape)}")


class CrossNet(nn.Module):
    """DCN-v2 cross network over the flattened embeddings x0 (F*D):
    x_{l+1} = x0 * (W_l x_l + b_l) + x_l, logit = w . x_L + b.

    Initialisation as in the public KD-DAGFM code: W_l xavier-normal (gain 1.414), b_l zero.
    """

    def __init__(self, num_fields: int, embed_dim: int, depth: int = 3):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth: expected a positive int, got {depth!r}")
        self.num_fields, self.embed_dim, self.depth = num_fields, embed_dim, depth
        n = num_fields * embed_dim
        self.cross = nn.ModuleList(nn.Linear(n, n) for _ in range(depth))
        for layer in self.cross:
            nn.init.xavier_normal_(layer.weight, gain=1.414)
            nn.init.zeros_(layer.bias)
        self.linear = nn.Linear(n, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        _check_emb(emb, self.num_fields, self.embed_dim)
        x0 = emb.reshape(emb.shape[0], -1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.linear(x).squeeze(-1)

    def flops_per_sample(self) -> int:
        n = self.num_fields * self.embed_dim
        # per layer: W_l x_l + b_l, the product with x0 and the residual add; then the readout
        return self.depth * (linear_flops(n, n) + 2 * n) + linear_flops(n, 1)


class CIN(nn.Module):
    """xDeepFM's Compressed Interaction Network: X^k = conv1x1(X^{k-1} (outer) X^0) per
    embedding dimension; logit = w . [sum_d X^1, ..., sum_d X^K] + b."""

    def __init__(self, num_fields: int, embed_dim: int, layers: Sequence[int] = (128, 128)):
        super().__init__()
        layers = tuple(int(h) for h in layers)
        if not layers or min(layers) < 1:
            raise ValueError(f"layers: expected a non-empty sequence of positive ints, got {layers!r}")
        self.num_fields, self.embed_dim, self.layers = num_fields, embed_dim, layers
        dims = (num_fields,) + layers
        self.convs = nn.ModuleList(nn.Conv1d(a * num_fields, b, 1) for a, b in zip(dims[:-1], dims[1:]))
        self.linear = nn.Linear(sum(layers), 1)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        _check_emb(emb, self.num_fields, self.embed_dim)
        B, D = emb.shape[0], emb.shape[2]
        x, pooled = emb, []
        for conv in self.convs:
            z = (x[:, :, None, :] * emb[:, None, :, :]).reshape(B, -1, D)
            x = conv(z)
            pooled.append(x.sum(dim=-1))
        return self.linear(torch.cat(pooled, dim=-1)).squeeze(-1)

    def flops_per_sample(self) -> int:
        F, D = self.num_fields, self.embed_dim
        dims = (F,) + self.layers
        # per layer: the outer products, the 1x1 convolution (a linear map at each of the D
        # positions) and the sum over D; then the readout
        total = sum(a * F * D + D * linear_flops(a * F, b) + b * D for a, b in zip(dims[:-1], dims[1:]))
        return total + linear_flops(sum(self.layers), 1)


class FM(nn.Module):
    """Plain factorization machine over the shared embeddings (the weak-student baseline):
    logit = b + w . flatten(x) + sum_{i<j} <x_i, x_j>. Only order <= 2 interactions."""

    def __init__(self, num_fields: int, embed_dim: int):
        super().__init__()
        self.num_fields, self.embed_dim = num_fields, embed_dim
        self.linear = nn.Linear(num_fields * embed_dim, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        _check_emb(emb, self.num_fields, self.embed_dim)
        s = emb.sum(dim=1)
        pair = 0.5 * (s * s - (emb * emb).sum(dim=1)).sum(dim=-1)
        return self.linear(emb.reshape(emb.shape[0], -1)).squeeze(-1) + pair

    def flops_per_sample(self) -> int:
        F, D = self.num_fields, self.embed_dim
        # the linear term; the field sum (FD), its square (D), the squares and their field sum
        # (2FD), the difference and the sum over D (2D), the half and the final add (2)
        return linear_flops(F * D, 1) + 3 * F * D + 3 * D + 2


TeacherFactory = Callable[..., nn.Module]

TEACHERS: Dict[str, TeacherFactory] = {
    "crossnet": lambda num_fields, embed_dim, depth=3, **_: CrossNet(num_fields, embed_dim, depth),
    "cin": lambda num_fields, embed_dim, cin_layers=(128, 128), **_: CIN(num_fields, embed_dim, cin_layers),
}


def register_teacher(name: str, factory: TeacherFactory, overwrite: bool = False) -> None:
    """Make ``factory(num_fields, embed_dim, **options) -> nn.Module`` selectable as ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable, got {type(factory).__name__}")
    if name in TEACHERS and not overwrite:
        raise ValueError(f"name: teacher {name!r} is already registered (pass overwrite=True)")
    TEACHERS[name] = factory


def teacher_names() -> list:
    return sorted(TEACHERS)


def build_teacher(name: str, num_fields: int, embed_dim: int, **options) -> nn.Module:
    """Build the registered teacher ``name``. Options the factory does not use are ignored."""
    try:
        factory = TEACHERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"teacher: unknown name {name!r}; expected one of {teacher_names()} "
                         "(or register one with dagfm_ext.teachers.register_teacher)") from None
    module = factory(num_fields, embed_dim, **options)
    if not isinstance(module, nn.Module):
        raise TypeError(f"teacher {name!r}: factory returned {type(module).__name__}, expected nn.Module")
    return module

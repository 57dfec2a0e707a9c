"""DAGFM and DAGFM+ (KD-DAGFM's student networks) as drop-in ``nn.Module``s over the fused op.

Both map field embeddings (B, F, D) to logits (B,). The DAG propagation runs in one call of
the fused op (``dagfm_propagate``; ``dagfm_propagate_with_sum`` for DAGFM+); only the upper
triangle of ``p``/``q`` is used (the op masks it implicitly, so the lower triangle gets exactly
zero gradient and no mask buffer is needed).
The maths of both networks is in docs/maths.md.
"""
from __future__ import annotations

import math
import operator
import re
from typing import Mapping, Sequence

import torch
from torch import nn

from . import cost as _cost
from . import field_mix as _field_mix
from . import functional as _functional
from . import propagate_sum as _propagate_sum
from .reference import INTERACTIONS

__all__ = ["DAGFM", "DAGFMPlus"]


def _check_positive(name: str, value) -> int:
    try:  # any integral type (numpy ints too), not bool or float
        v = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        v = None
    if v is None or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return v


def _mix(connect: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """h0 = C @ x, (B, F, D): the fused op (its backward computes grad_C without the (B, F, F)
    products a batched matmul's backward writes and sums)."""
    return _field_mix.field_mix(emb, connect)


def _plain_linear(linear: nn.Module) -> bool:
    """Whether calling ``linear`` does nothing but F.linear: an nn.Linear without forward hooks."""
    return (type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))


class _DagBase(nn.Module):
    """Field mixing ``connect_layer`` (identity-initialised) and the propagation weights."""

    def __init__(self, num_fields: int, embed_dim: int, depth: int, interaction: str):
        super().__init__()
        self.num_fields = _check_positive("num_fields", num_fields)
        self.embed_dim = _check_positive("embed_dim", embed_dim)
        self.depth = _check_positive("depth", depth)
        if interaction not in INTERACTIONS:
            raise ValueError(f"interaction: expected one of {INTERACTIONS}, got {interaction!r}")
        self.interaction = interaction
        F, D, L = num_fields, embed_dim, depth
        # connect_layer[j, i] mixes field i into field j (h0 = C @ x), as in the public code.
        self.connect_layer = nn.Parameter(torch.eye(F))
        if interaction == "kernel":
            self.p = nn.Parameter(torch.empty(L, F, F, D, D))
        else:
            self.p = nn.Parameter(torch.empty(L, F, F, D))
        if interaction == "outer":
            self.q = nn.Parameter(torch.empty(L, F, F, D))
        else:
            self.register_parameter("q", None)
        self.reset_dag_parameters()

    def reset_dag_parameters(self) -> None:
        F, D = self.num_fields, self.embed_dim
        # The public code uses xavier_normal_(gain=1.414) on each (F, F, D) layer, i.e.
        # std = 1.414 / sqrt(F * D). The kernel's (D, D) edge matrix gets the same std so that
        # at init it behaves like a (full-rank) outer edge of comparable scale.
        std = 1.414 / math.sqrt(F * D)
        with torch.no_grad():
            nn.init.normal_(self.p, 0.0, std)
            if self.q is not None:
                nn.init.normal_(self.q, 0.0, std)
            self.connect_layer.copy_(torch.eye(F))

    def _check_emb(self, emb: torch.Tensor, want: torch.dtype) -> None:
        """emb must be (B, F, D) of dtype ``want`` (the module's; any floating dtype under autocast,
        where the matmuls pick it)."""
        shape = emb.shape
        if len(shape) != 3 or shape[1] != self.num_fields or shape[2] != self.embed_dim:
            raise ValueError(f"emb: expected shape (B, {self.num_fields}, {self.embed_dim}), "
                             f"got {tuple(shape)}")
        if emb.dtype != want and not (emb.is_floating_point() and torch.is_autocast_enabled(emb.device.type)):
            raise ValueError(f"emb: expected dtype {want} (the module's), got {emb.dtype}")

    def _dag_parameters(self):
        """(connect_layer, p, q), read from the parameter table: a microsecond less per call than
        three attribute look-ups through nn.Module, which remain for parametrized ones."""
        params = self._parameters
        try:
            return params["connect_layer"], params["p"], params["q"]
        except KeyError:
            return self.connect_layer, self.p, self.q

    def _mixed_and_weights(self, emb: torch.Tensor):
        """(h0, p, q): emb checked and mixed, and the propagation weights."""
        connect, p, q = self._dag_parameters()
        self._check_emb(emb, connect.dtype)
        return _mix(connect, emb), p, q

    def mixed(self, emb: torch.Tensor) -> torch.Tensor:
        """h0 = C @ x, (B, F, D)."""
        return self._mixed_and_weights(emb)[0]

    def extra_repr(self) -> str:
        return (f"num_fields={self.num_fields}, embed_dim={self.embed_dim}, depth={self.depth}, "
                f"interaction={self.interaction!r}")

    # -- public-reference weight import -------------------------------------------------------
    def _load_dag_weights(self, sd: Mapping[str, torch.Tensor], prefix: str) -> set:
        """Copy p.{t}, q.{t} and connect_layer; returns the keys used."""
        F, D, L = self.num_fields, self.embed_dim, self.depth
        used = set()

        def take(key, shape):
            full = prefix + key
            if full not in sd:
                raise KeyError(f"sd: missing key {full!r}")
            value = torch.as_tensor(sd[full])
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"sd[{full!r}]: expected shape {tuple(shape)}, "
                                 f"got {tuple(value.shape)}")
            used.add(full)
            return value

        edge_shape = (F, F, D, D) if self.interaction == "kernel" else (F, F, D)
        with torch.no_grad():
            for t in range(L):
                self.p[t].copy_(take(f"p.{t}", edge_shape))
                if self.q is not None:
                    self.q[t].copy_(take(f"q.{t}", (F, F, D)))
            self.connect_layer.copy_(take("connect_layer", (F, F)))
        extra_layers = [k for k in sd if k.startswith(prefix)
                        and re.fullmatch(r"[pq]\.\d+", k[len(prefix):])
                        and int(k[len(prefix) + 2:]) >= L]
        if extra_layers:
            raise ValueError(f"sd: has layers beyond depth={L}: {sorted(extra_layers)}")
        return used


def _find_prefix(sd: Mapping[str, torch.Tensor], prefix: str | None) -> str:
    if not isinstance(sd, Mapping):
        raise TypeError(f"sd: expected a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    if prefix is not None:
        return prefix
    # Accept the bare layout or any single wrapper prefix (e.g. 'student_network.').
    candidates = {k[: -len("connect_layer")] for k in sd if k.endswith("connect_layer")}
    if len(candidates) != 1:
        raise KeyError("sd: expected exactly one '<prefix>connect_layer' key, found "
                       f"{sorted(c + 'connect_layer' for c in candidates)}; pass prefix=")
    return candidates.pop()


class DAGFM(_DagBase):
    """Directed Acyclic Graph Factorization Machine (Tian et al., WSDM 2023).

    ``forward(emb)``: emb (B, F, D) -> logits (B,). The readout is a linear layer over the
    (L+1)*F states in t-major order, exactly as the public implementations' ``linear``.
    """

    def __init__(self, num_fields: int, embed_dim: int, depth: int = 3, interaction: str = "inner"):
        super().__init__(num_fields, embed_dim, depth, interaction)
        self.linear = nn.Linear((depth + 1) * num_fields, 1)

    def states(self, emb: torch.Tensor) -> torch.Tensor:
        """The DAG states s (B, L+1, F)."""
        return _functional.dagfm_propagate(*self._mixed_and_weights(emb), self.interaction)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        linear = self._modules["linear"]
        if _plain_linear(linear):
            connect, p, q = self._dag_parameters()
            weight, bias = linear._parameters["weight"], linear._parameters["bias"]
            if bias is not None and _functional.plain_inference((emb, connect, p, q, weight, bias)):
                # Serving: the same products as below, each straight to its kernel (the readout as
                # one matrix-vector product: the linear layer's product has a single column).
                self._check_emb(emb, connect.dtype)
                h0 = _field_mix.mix_no_grad(emb, connect)
                s = _functional.propagate_no_grad(h0, p, q, self.interaction)
                return torch.addmv(bias, s.view(s.shape[0], -1), weight.view(-1))
        h0, p, q = self._mixed_and_weights(emb)
        s = _functional.dagfm_propagate(h0, p, q, self.interaction)
        return linear(s.reshape(s.shape[0], -1)).squeeze(-1)

    def flops_per_sample(self) -> int:
        return _cost.dagfm_flops_per_sample(self.num_fields, self.embed_dim, self.depth, self.interaction)

    def load_official_state_dict(self, sd: Mapping[str, torch.Tensor], prefix: str | None = None,
                                 strict: bool = True) -> None:
        """Load weights saved by the public KD-DAGFM / RecBole ``DAGFM`` (keys ``p.{t}``,
        ``q.{t}``, ``connect_layer``, ``linear.weight``, ``linear.bias``), bare or under one
        prefix such as ``student_network.`` (found automatically unless given). With
        ``strict``, other keys under the same prefix are an error.
        """
        prefix = _find_prefix(sd, prefix)
        used = self._load_dag_weights(sd, prefix)
        n = (self.depth + 1) * self.num_fields
        for name, shape in (("linear.weight", (1, n)), ("linear.bias", (1,))):
            full = prefix + name
            if full not in sd:
                raise KeyError(f"sd: missing key {full!r}")
            value = torch.as_tensor(sd[full])
            if tuple(value.shape) != shape:
                raise ValueError(f"sd[{full!r}]: expected shape {shape}, got {tuple(value.shape)}")
            with torch.no_grad():
                getattr(self.linear, name.split(".")[1]).copy_(value)
            used.add(full)
        # adj_matrix is the public code's (non-learned) mask: nothing to load.
        unused = [k for k in sd if k.startswith(prefix) and k not in used
                  and k[len(prefix):] != "adj_matrix"]
        if strict and unused:
            raise ValueError(f"sd: unexpected keys for DAGFM: {sorted(unused)}")


class DAGFMPlus(_DagBase):
    """KD-DAGFM+: the same propagation, read out by an MLP over flatten(h0 + sum_t h^t).

    The sum z = h0 + sum_t h^t is the fused op's second output (``dagfm_propagate_with_sum``).
    """

    def __init__(self, num_fields: int, embed_dim: int, depth: int = 3, interaction: str = "inner",
                 mlp: Sequence[int] = (256, 128), dropout: float = 0.0):
        super().__init__(num_fields, embed_dim, depth, interaction)
        dims = [num_fields * embed_dim] + [_check_positive("mlp", int(h)) for h in mlp]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(dims[-1], 1))
        self.mlp = nn.Sequential(*layers)
        self.mlp_dims = tuple(dims[1:])

    def hidden_sum(self, emb: torch.Tensor) -> torch.Tensor:
        """h0 + sum_{t=1..L} h^t, (B, F, D)."""
        return _propagate_sum.dagfm_propagate_with_sum(*self._mixed_and_weights(emb), self.interaction)[1]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        z = self.hidden_sum(emb)
        return self.mlp(z.reshape(z.shape[0], -1)).squeeze(-1)

    def flops_per_sample(self) -> int:
        return _cost.dagfm_plus_flops_per_sample(self.num_fields, self.embed_dim, self.depth,
                                                 self.interaction, self.mlp_dims)

    def load_official_state_dict(self, sd: Mapping[str, torch.Tensor], prefix: str | None = None,
                                 strict: bool = True) -> None:
        """Load the DAG weights (``p.{t}``, ``q.{t}``, ``connect_layer``) of a public
        DeepDAGFM checkpoint; its MLP layout differs between implementations, so the MLP is
        loaded from ``mlp.*`` keys in this module's own layout when present."""
        prefix = _find_prefix(sd, prefix)
        used = self._load_dag_weights(sd, prefix)
        mlp_sd = {k[len(prefix) + 4:]: v for k, v in sd.items() if k.startswith(prefix + "mlp.")}
        if mlp_sd:
            self.mlp.load_state_dict(mlp_sd, strict=strict)
            used |= {prefix + "mlp." + k for k in mlp_sd}
        unused = [k for k in sd if k.startswith(prefix) and k not in used
                  and k[len(prefix):] != "adj_matrix"]
        if strict and unused:
            raise ValueError(f"sd: unexpected keys for DAGFMPlus: {sorted(unused)}")

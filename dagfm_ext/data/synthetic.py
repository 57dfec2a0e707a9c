"""Synthetic data whose labels come from planted interactions up to order 4."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .container import TabularData, split_indices
from .schema import FeatureSchema, FieldSpec

__all__ = ["make_synthetic"]


def make_synthetic(n: int = 20000, num_fields: int = 8, vocab: int = 16, max_order: int = 4,
                   seed: int = 0, split_seed: Optional[int] = None) -> TabularData:
    """Labels drawn from sigmoid(sum_k w_k prod_{f in S_k} z_f[x_f]): each id has a hidden
    scalar z ~ N(0, 1) and the planted field sets S_k cover every order 1..max_order (two sets
    per order, over random distinct fields), so a model limited to order 2 cannot fit them."""
    if num_fields < max_order:
        raise ValueError(f"num_fields: expected >= max_order ({max_order}), got {num_fields}")
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab + 1, size=(n, num_fields))
    z = rng.normal(size=(num_fields, vocab + 1))
    logit = np.full(n, -0.2)
    for order in range(1, max_order + 1):
        for _ in range(2):
            fs = rng.choice(num_fields, size=order, replace=False)
            term = np.ones(n)
            for f in fs:
                term *= z[f, x[:, f]]
            logit += rng.choice([-1.0, 1.0]) * (0.5 if order == 1 else 0.8 if order == 2 else 1.2) * term
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    fields = [FieldSpec(f"f{i}", vocab={str(v): v for v in range(1, vocab + 1)}) for i in range(num_fields)]
    return TabularData("synthetic", FeatureSchema(fields), x.astype(np.int32), y,
                       split_indices(n, seed if split_seed is None else split_seed))

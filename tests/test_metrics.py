"""gAUC: per-user AUC weighted by the user's rows, against scikit-learn user by user."""
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dagfm_ext import metrics


def gauc_by_loop(y, z, g):
    total = weight = 0.0
    for u in np.unique(g):
        m = g == u
        if len(np.unique(y[m])) == 2:
            total += roc_auc_score(y[m], z[m]) * m.sum()
            weight += m.sum()
    return total / weight


@pytest.mark.parametrize("seed", range(5))
def test_gauc_matches_per_user_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    g = rng.integers(0, 200, size=n)
    y = (rng.random(n) < 0.3).astype(np.float32)
    z = np.round(rng.normal(size=n) + y, 1)  # rounded: many tied scores inside a user
    assert metrics.gauc(y, z, g) == pytest.approx(gauc_by_loop(y, z, g), rel=1e-12)


def test_gauc_skips_single_class_users_and_reports_it():
    y = np.array([1, 0, 1, 1, 0, 0])
    z = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    g = np.array([7, 7, 8, 8, 9, 9])  # users 8 and 9 have one class only
    assert metrics.gauc(y, z, g) == 1.0
    assert math.isnan(metrics.gauc([1, 1], [0.1, 0.2], [3, 3]))
    m = metrics.evaluate_logits(y, z, groups=g)
    assert set(m) == {"auc", "logloss", "gauc"} and m["gauc"] == 1.0
    assert set(metrics.evaluate_logits(y, z)) == {"auc", "logloss"}
    with pytest.raises(ValueError, match="groups: expected one group per label"):
        metrics.gauc(y, z, g[:3])

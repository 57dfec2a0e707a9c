"""AUC and LogLoss, computed by scikit-learn from logits, and the per-user gAUC."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

__all__ = ["sigmoid", "auc", "logloss", "gauc", "evaluate_logits", "require_both_classes"]


def sigmoid(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def auc(labels, logits) -> float:
    """ROC AUC; NaN when only one class is present (instead of raising mid-training)."""
    y = np.asarray(labels)
    if y.size == 0 or np.unique(y).size < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(logits, dtype=np.float64)))


def logloss(labels, logits) -> float:
    p = np.clip(sigmoid(logits), 1e-7, 1 - 1e-7)
    return float(log_loss(np.asarray(labels), p, labels=[0, 1]))


def gauc(labels, logits, groups) -> float:
    """Group AUC as DIN reports it: each user's AUC weighted by the user's number of rows, over
    the users that have both classes (NaN if none has). Vectorised: one sort by (user, score),
    ties share their average rank, and each user's AUC is the Mann-Whitney rank-sum formula."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(logits, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    if not (len(y) == len(s) == len(g)):
        raise ValueError(f"groups: expected one group per label ({len(y)}), got {len(g)} (and {len(s)} logits)")
    if len(y) == 0:
        return float("nan")
    order = np.lexsort((s, g))
    y, s, g = y[order], s[order], g[order]
    pos = np.arange(len(y))
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    first = np.flatnonzero(new_tie)
    last = np.r_[first[1:], len(y)] - 1
    group_start = np.maximum.accumulate(np.where(new_group, pos, 0))
    rank = ((first + last) / 2.0)[np.cumsum(new_tie) - 1] - group_start + 1  # 1-based, within the user
    gid = np.cumsum(new_group) - 1
    rows = np.bincount(gid).astype(np.float64)
    n_pos = np.bincount(gid, weights=y)
    n_neg = rows - n_pos
    both = (n_pos > 0) & (n_neg > 0)
    if not both.any():
        return float("nan")
    rank_sum = np.bincount(gid, weights=rank * y)[both]
    per_user = (rank_sum - n_pos[both] * (n_pos[both] + 1) / 2) / (n_pos[both] * n_neg[both])
    return float(np.sum(per_user * rows[both]) / np.sum(rows[both]))


def evaluate_logits(labels, logits, groups=None) -> dict:
    """AUC and LogLoss; with ``groups`` (the user of each row) also gAUC."""
    out = {"auc": auc(labels, logits), "logloss": logloss(labels, logits)}
    if groups is not None:
        out["gauc"] = gauc(labels, logits, groups)
    return out


def require_both_classes(labels, what: str) -> None:
    """ValueError unless ``labels`` hold both 0 and 1 (AUC is undefined otherwise); ``what``
    names the labels in the message."""
    y = np.asarray(labels)
    if y.size == 0:
        raise ValueError(f"{what} has no rows; AUC needs rows of both classes")
    if y.min() == y.max():  # O(n), no sort: Criteo's splits have tens of millions of labels
        raise ValueError(f"{what} has only label {y.flat[0]:g}; AUC is undefined without both classes")

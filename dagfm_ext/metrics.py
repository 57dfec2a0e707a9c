"""AUC and LogLoss, computed by scikit-learn from logits."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

__all__ = ["sigmoid", "auc", "logloss", "evaluate_logits", "require_both_classes"]


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


def evaluate_logits(labels, logits) -> dict:
    return {"auc": auc(labels, logits), "logloss": logloss(labels, logits)}


def require_both_classes(labels, what: str) -> None:
    """ValueError unless ``labels`` hold both 0 and 1 (AUC is undefined otherwise); ``what``
    names the labels in the message."""
    y = np.asarray(labels)
    if y.size == 0:
        raise ValueError(f"{what} has no rows; AUC needs rows of both classes")
    if y.min() == y.max():  # O(n), no sort: Criteo's splits have tens of millions of labels
        raise ValueError(f"{what} has only label {y.flat[0]:g}; AUC is undefined without both classes")

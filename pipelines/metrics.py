"""Evaluation metrics shared by training (model selection) and evaluation."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def mean_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean AUROC over the labels that have both classes (NaN when none has).

    Args:
        labels: (N, L) 0/1.
        scores: (N, L) predicted probabilities.
    """
    aurocs = [roc_auc_score(labels[:, k], scores[:, k]) for k in range(labels.shape[1])
              if 0 < labels[:, k].sum() < len(labels)]
    return float(np.mean(aurocs)) if aurocs else float("nan")

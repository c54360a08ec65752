"""Evaluation metrics: rank-based AUROC over bootstrap resamples, Youden thresholds, threshold metrics, fairness.

Bootstrap resamples are index arrays (B, N) drawn once per evaluation data set and shared by every model
evaluated on it, so model comparisons are paired. A resample is represented by its counts (how often each
example was drawn, (B, N)); every metric is then a weighted statistic over the original examples, which
makes all resamples one vectorised computation:

- AUROC is the Mann-Whitney statistic with ties counted half: examples are sorted once by score, grouped by
  equal score, and per resample the weighted positives of each group are matched with the weighted negatives
  below it (a cumulative sum). Exact, so it equals sklearn's ``roc_auc_score`` to rounding.
- Threshold metrics are matrix products of the counts with indicator vectors.
"""

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


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` draws of ``n`` indices with replacement, (B, n) int32, reproducible from ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n), dtype=np.int32)


def resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each of the ``n`` examples appears in each resample: (B, n) int32."""
    counts = np.empty((indices.shape[0], n), dtype=np.int32)
    for row, drawn in zip(counts, indices, strict=True):   # row by row: no (B, n) int64 temporaries
        row[:] = np.bincount(drawn, minlength=n)
    return counts


def _sorted(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Scores ascending, their labels (bool) and the resample counts in that order ((B, N) int32)."""
    order = np.argsort(scores, kind="stable")
    counts = np.ones((1, len(labels)), np.int32) if counts is None else counts
    return scores[order], labels[order].astype(bool), np.take(counts, order, axis=1)


def _grouped(values: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Weighted positives and negatives per distinct score (B, G) and the G score values, ascending."""
    pos = np.where(positive, weights, 0)
    neg = weights - pos
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    if len(starts) < len(values):   # ties: merge equal scores into one group
        pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
    return pos, neg, values[starts]


def auroc(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """AUROC of one label for each resample (NaN where a resample lacks a class).

    Args:
        labels: (N,) 0/1.
        scores: (N,) scores.
        counts: (B, N) resample counts; None means the data as it is (B = 1).

    Returns:
        (B,) float64.
    """
    values, positive, weights = _sorted(labels, scores, counts)
    mask = positive.astype(np.int32)
    npos = np.einsum("ij,j->i", weights, mask, dtype=np.float64)
    total = weights.sum(axis=1, dtype=np.float64)
    if np.any(values[1:] == values[:-1]):
        pos, neg, _ = _grouped(values, positive, weights)
        below = np.cumsum(neg, axis=1) - neg
        # Each positive beats the negatives below its score and ties with those at it (one half): x2 stays exact.
        wins = (pos * (2 * below + neg)).sum(axis=1, dtype=np.float64) / 2
    else:
        # Without ties the negatives at or below a positive's position are exactly those it beats.
        below = np.multiply(weights, 1 - mask)
        np.cumsum(below, axis=1, out=below)
        wins = np.einsum("ij,ij,j->i", weights, below, mask, dtype=np.float64)
    pairs = npos * (total - npos)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def auroc_matrix(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Per-label AUROC for each resample: (B, L) from labels and scores (N, L)."""
    return np.stack([auroc(labels[:, k], scores[:, k], counts) for k in range(labels.shape[1])], axis=1)


def youden_threshold(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """The score threshold maximising Youden's J = TPR - FPR (predict positive when score >= threshold).

    Args:
        labels: (N,) 0/1.
        scores: (N,) scores.
        counts: (B, N) resample counts, to choose one threshold per resample (the study's way); None: one
            threshold for the data as it is.

    Returns:
        (B,) thresholds (NaN where a resample lacks a class).
    """
    pos, neg, values = _grouped(*_sorted(labels, scores, counts))
    # Predicting positive from group g upwards: the true and false positives are the reversed cumulative sums.
    tp = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]
    fp = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        j = tp / pos.sum(axis=1, keepdims=True) - fp / neg.sum(axis=1, keepdims=True)
    valid = (pos.sum(axis=1) > 0) & (neg.sum(axis=1) > 0)
    best = np.argmax(np.where(np.isnan(j), -np.inf, j), axis=1)
    return np.where(valid, values[best], np.nan)


def threshold_metrics(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray,
                      counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Accuracy, sensitivity, specificity and F1 of one label at a threshold, for each resample.

    Args:
        labels: (N,) 0/1.
        scores: (N,) scores.
        thresholds: a scalar (fixed) or (B,) (one per resample).
        counts: (B, N) resample counts; None: the data as it is.

    Returns:
        Each metric as (B,) float64 (NaN where undefined).
    """
    counts = np.ones((1, len(labels)), np.int32) if counts is None else counts
    weights = counts.astype(np.float64)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(weights),))
    y = labels.astype(bool)
    if np.all(thresholds == thresholds[0]):
        predicted = (scores >= thresholds[0])[None, :]
    else:
        predicted = scores[None, :] >= thresholds[:, None]
    tp = (weights * (predicted & y)).sum(axis=1)
    fp = (weights * (predicted & ~y)).sum(axis=1)
    positives, total = weights @ y.astype(np.float64), weights.sum(axis=1)
    negatives = total - positives
    fn, tn = positives - tp, negatives - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"accuracy": (tp + tn) / total, "sensitivity": tp / positives, "specificity": tn / negatives,
                "f1": 2 * tp / (2 * tp + fp + fn)}


def percentile_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of ``values`` (B,), ignoring NaN resamples."""
    tail = (1 - confidence) / 2 * 100
    finite = values[np.isfinite(values)]
    if not len(finite):
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def paired_p_value(better: np.ndarray, worse: np.ndarray) -> float:
    """One-sided paired bootstrap p-value for ``better`` > ``worse``: the share of resamples where it is not."""
    ok = np.isfinite(better) & np.isfinite(worse)
    return float(np.mean(better[ok] <= worse[ok])) if ok.any() else float("nan")


def parity_difference(metric: dict[str, float | np.ndarray], sizes: dict[str, int],
                      group: str) -> float | np.ndarray:
    """The study's statistical parity difference of one group's metric against the others.

    With two groups it is metric(group) - metric(other) (female minus male for sex); with more, the group's
    metric minus the size-weighted mean of the other groups' metric (the age groups). Works elementwise on
    arrays (one value per resample); a group whose metric is undefined (NaN) is left out of the mean.

    Args:
        metric: the metric per group: a number, or an array per group (all the same shape).
        sizes: the group sizes.
        group: the group to compare.
    """
    others = [g for g in metric if g != group and sizes.get(g, 0) > 0]
    target = np.asarray(metric[group], dtype=np.float64)
    if not others:
        return float("nan") if target.ndim == 0 else np.full(target.shape, np.nan)
    values = np.stack([np.asarray(metric[g], dtype=np.float64) for g in others])
    weights = np.array([sizes[g] for g in others], dtype=np.float64).reshape(-1, *[1] * target.ndim)
    defined = np.isfinite(values)
    total = (weights * defined).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        difference = np.where(total > 0, target - (weights * np.where(defined, values, 0)).sum(axis=0) / total,
                              np.nan)
    return float(difference) if difference.ndim == 0 else difference

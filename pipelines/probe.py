"""The linear probe: how useful a pretrained model's frozen features are, measured on public data only.

Features of the public source's train split (the pooled, normalised features the classifier head reads) fit one
logistic regression per label; the mean AUROC on the public source's test split is the probe's figure. The same
probe on a randomly initialised network of the same size and seed is the baseline, and a paired bootstrap over
the test images gives the gain's confidence interval and one-sided p-value. It is how a pretraining is tuned
without touching private data.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from models.convnext import create_model, embed
from models.device import model_device
from models.labels import LABELS
from pipelines.data.store import SiteStore
from pipelines.metrics import auroc_matrix, bootstrap_indices, paired_p_value, percentile_ci, resample_counts

RESAMPLES = 500


def linear_probe(model: nn.Module, size: str, store: SiteStore, seed: int) -> dict[str, float]:
    """Probes ``model`` and a random ``size`` network on the public source ``store``.

    Args:
        model: the pretrained model.
        size: its ConvNeXt size (for the random baseline).
        store: the public source's prepared store, with its official train and test splits.
        seed: seeds the random baseline's weights and the bootstrap.

    Returns:
        ``probe_test_mean_auroc``, ``probe_random_init_test_mean_auroc``, ``probe_gain`` with its 95% CI
        (``probe_gain_ci_low``/``_high``) and ``probe_gain_p`` (one-sided, gain > 0); empty when the source has
        no labels to probe with.
    """
    train_rows, train_meta = store.split("train")
    test_rows, test_meta = store.split("test")
    if not set(LABELS) <= set(train_meta.columns):
        return {}
    train_labels, test_labels = train_meta[list(LABELS)].to_numpy(), test_meta[list(LABELS)].to_numpy()
    train_images, test_images = np.asarray(store.images[train_rows]), np.asarray(store.images[test_rows])

    import torch

    torch.manual_seed(seed)
    scores = {name: _fit_and_score(embed(network, train_images), train_labels, embed(network, test_images))
              for name, network in (("pretrained", model), ("random", create_model(size).to(model_device(model))))}
    counts = resample_counts(bootstrap_indices(len(test_labels), RESAMPLES, seed), len(test_labels))
    point = {name: float(np.nanmean(auroc_matrix(test_labels, s)[0])) for name, s in scores.items()}
    resampled = {name: np.nanmean(auroc_matrix(test_labels, s, counts), axis=1) for name, s in scores.items()}
    low, high = percentile_ci(resampled["pretrained"] - resampled["random"])
    return {"probe_test_mean_auroc": point["pretrained"], "probe_random_init_test_mean_auroc": point["random"],
            "probe_gain": point["pretrained"] - point["random"], "probe_gain_ci_low": low, "probe_gain_ci_high": high,
            "probe_gain_p": paired_p_value(resampled["pretrained"], resampled["random"])}


def _fit_and_score(train: np.ndarray, labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    """One logistic regression per label on standardised features; test probabilities (N, L)."""
    scaler = StandardScaler().fit(train)
    train, test = scaler.transform(train), scaler.transform(test)
    scores = np.full((len(test), labels.shape[1]), 0.5)
    for k in range(labels.shape[1]):
        if 0 < labels[:, k].sum() < len(labels):
            scores[:, k] = LogisticRegression(max_iter=2000).fit(train, labels[:, k]).predict_proba(test)[:, 1]
    return scores

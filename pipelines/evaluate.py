"""The evaluate stage: every model of the grid on the private test split and on every external site's test data.

As the study does it: per-label and mean AUROC with 1,000 bootstrap resamples per evaluation set, drawn once,
saved, and shared by every model (so comparisons are paired): 95% percentile intervals and one-sided paired
p-values (each DP model against the non-private model of its init; each init against ``scratch`` at the same
epsilon). Accuracy, sensitivity, specificity and F1 at per-label thresholds chosen by Youden's J on the
private val split and then fixed (``evaluate.threshold: resample`` re-chooses them inside each test resample,
as the study's code did; every output row says which). Fairness by sex, age bin and their intersection:
subgroup AUROC with intervals, the study's statistical parity difference, underdiagnosis (predicting "no
finding" for an image with a finding) and fairlearn's equalized-odds difference; subgroups with fewer
positives than ``evaluate.min_subgroup_positives`` in some label are flagged.

Outputs under ``<artifacts>/evaluate/``: ``predictions/<site>/<cell>.npy`` (never sent to MLflow),
``bootstrap/<site>.npy`` (the resample indices), ``thresholds.json``, ``results.csv``, ``fairness.csv``,
``comparisons.csv`` and ``cross_site.csv``; ``<artifacts>/metrics.json`` holds the DVC metrics. Aggregates go to
each model's MLflow run and to an ``evaluate`` run.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from models.convnext import predict
from models.weights import load_model
from pipelines.atomic import atomic_folder
from pipelines.cells import Cell, trained_cells
from pipelines.config import Params, Train
from pipelines.data.schema import AGE_BIN_NAMES, LABELS, age_bin
from pipelines.data.store import open_site
from pipelines.metrics import (
    auroc_matrix,
    bootstrap_indices,
    paired_p_value,
    parity_difference,
    percentile_ci,
    resample_counts,
    threshold_metrics,
    youden_threshold,
)
from pipelines.stage import compute_device, run_stage
from pipelines.tracking import cell_run_id, stage_run

STAGE = "evaluate"
METRICS = "metrics.json"
NO_FINDING = LABELS.index("no_finding")
FINDINGS = [k for k, label in enumerate(LABELS) if label != "no_finding"]


def evaluate(params: Params) -> dict[str, object]:
    """Evaluates every grid cell on every evaluation site and writes the tables.

    Returns:
        The cross-site matrix (mean AUROC by cell and site).
    """
    e = params.evaluate
    device = compute_device(params)
    cells = trained_cells(params)
    prepared = Path(params.base.artifacts) / "prepare"
    private = params.private_site()
    sites = [private] + [name for name, site in params.data.sites.items() if site.role == "external"]
    stores = {site: open_site(prepared / site) for site in sites}
    val_rows, val_meta = stores[private].split("val")
    val_images, val_labels = np.asarray(stores[private].images[val_rows]), val_meta[list(LABELS)].to_numpy()
    tests = {site: stores[site].split("test") for site in sites}
    results, fairness, per_resample, scores, thresholds = [], [], {}, {}, {}
    with atomic_folder(Path(params.base.artifacts) / STAGE) as out:
        for cell in cells:
            model = load_model(cell.folder)[0].to(device)
            val_scores = predict(model, val_images)
            thresholds[cell.name] = np.array([youden_threshold(val_labels[:, k], val_scores[:, k])[0]
                                              for k in range(len(LABELS))])
            for site, (rows, _) in tests.items():
                scores[cell.name, site] = predict(model, np.asarray(stores[site].images[rows]))
                (out / "predictions" / site).mkdir(parents=True, exist_ok=True)
                np.save(out / "predictions" / site / f"{cell.name}.npy", scores[cell.name, site])
            print(f"evaluate: predicted {cell.name} on {len(sites)} sites", file=sys.stderr)
        (out / "thresholds.json").write_text(json.dumps(
            {"mode": e.threshold, "chosen_on": f"{private} val", "labels": list(LABELS),
             "cells": {name: chosen.tolist() for name, chosen in thresholds.items()}}, indent=2))
        (out / "bootstrap").mkdir()
        for site, (_, meta) in tests.items():
            labels = meta[list(LABELS)].to_numpy()
            indices = bootstrap_indices(len(meta), e.resamples, _site_seed(e.seed, site))
            np.save(out / "bootstrap" / f"{site}.npy", indices)
            counts = resample_counts(indices, len(meta))
            for cell in cells:
                cell_scores, chosen = scores[cell.name, site], thresholds[cell.name]
                rows, per_resample[cell.name, site] = _site_metrics(labels, cell_scores, chosen, counts, e)
                results += [{**cell.describe(), "site": site, **row} for row in rows]
                fairness += [{**cell.describe(), "site": site, **row}
                             for row in _fairness(meta, labels, cell_scores, chosen, counts, e)]
            print(f"evaluate: {site}: {len(meta)} test images, {e.resamples} resamples", file=sys.stderr)
        results, fairness = pd.DataFrame(results), pd.DataFrame(fairness)
        comparisons = _comparisons(cells, sites, per_resample)
        cross_site = _cross_site(results)
        results.to_csv(out / "results.csv", index=False)
        fairness.to_csv(out / "fairness.csv", index=False)
        comparisons.to_csv(out / "comparisons.csv", index=False)
        cross_site.to_csv(out / "cross_site.csv")
    # DVC metrics live beside the output folder (a file inside a DVC output cannot be declared again).
    (Path(params.base.artifacts) / METRICS).write_text(json.dumps(_dvc_metrics(cells, results, private), indent=2))
    _log(params, cells, results, private)
    return {"cross_site": cross_site.to_dict()}


def _site_seed(seed: int, site: str) -> int:
    """Each evaluation set gets its own resamples, the same for every model and every run."""
    return seed + int(hashlib.sha256(site.encode()).hexdigest()[:8], 16)


def _site_metrics(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray, counts: np.ndarray,
                  e: object) -> tuple[list[dict[str, object]], np.ndarray]:
    """Rows (metric, label, value, CI) for one model on one site, and its per-resample mean AUROC (B,)."""
    point = auroc_matrix(labels, scores)[0]
    resampled = auroc_matrix(labels, scores, counts)
    present = np.isfinite(point)            # labels with both classes in this test set
    mean_curve = _label_mean(np.where(present, resampled, np.nan))
    rows = [_row("auroc", "mean", float(np.mean(point[present])) if present.any() else math.nan, mean_curve, e)]
    for k, label in enumerate(LABELS):
        rows.append(_row("auroc", label, point[k], resampled[:, k], e))
        if e.threshold == "val":
            fixed, chosen = thresholds[k], thresholds[k]
        else:
            fixed, chosen = youden_threshold(labels[:, k], scores[:, k])[0], \
                youden_threshold(labels[:, k], scores[:, k], counts)
        at_point = threshold_metrics(labels[:, k], scores[:, k], fixed)
        at_resample = threshold_metrics(labels[:, k], scores[:, k], chosen, counts)
        rows += [_row(name, label, at_point[name][0], at_resample[name], e) for name in at_point]
    return [{**row, "threshold": e.threshold} for row in rows], mean_curve


def _row(metric: str, label: str, value: float, resampled: np.ndarray, e: object) -> dict[str, object]:
    low, high = percentile_ci(resampled, e.confidence)
    return {"metric": metric, "label": label, "value": float(value), "ci_low": low, "ci_high": high}


def subgroups(meta: pd.DataFrame) -> dict[tuple[str, str], np.ndarray]:
    """Masks of the fairness subgroups: sex, age bin, and sex x age bin (unknown sex or age belongs to none)."""
    sex, age = _feature(meta, "sex"), _feature(meta, "age")
    groups = {("sex", s): sex == s for s in ("F", "M")}
    groups |= {("age", a): age == a for a in AGE_BIN_NAMES}
    groups |= {("sex_x_age", f"{s} {a}"): (sex == s) & (age == a) for s in ("F", "M") for a in AGE_BIN_NAMES}
    return groups


def _fairness(meta: pd.DataFrame, labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray,
              counts: np.ndarray, e: object) -> list[dict[str, object]]:
    """Per-subgroup rows (n, positives, mean AUROC with CI, accuracy, underdiagnosis, flag) plus the gaps."""
    from fairlearn.metrics import equalized_odds_difference

    predicted = scores >= thresholds
    rows, auroc_curves, auroc_points, accuracy, sizes = [], {}, {}, {}, {}
    for (attribute, group), mask in subgroups(meta).items():
        n = int(mask.sum())
        if n == 0:
            continue
        g_labels, g_scores, g_counts = labels[mask], scores[mask], counts[:, mask]
        point = _label_mean(auroc_matrix(g_labels, g_scores))[0]
        curve = _label_mean(auroc_matrix(g_labels, g_scores, g_counts))
        low, high = percentile_ci(curve, e.confidence)
        sick = mask & (labels[:, NO_FINDING] == 0)
        under = float(predicted[sick, NO_FINDING].mean()) if sick.any() else math.nan
        positives = g_labels.sum(axis=0)
        acc = float(np.mean(predicted[mask] == labels[mask].astype(bool)))
        rows.append({"attribute": attribute, "group": group, "n": n, "min_positives": int(positives.min()),
                     "flagged": bool(positives.min() < e.min_subgroup_positives),
                     "mean_auroc": point,
                     "ci_low": low, "ci_high": high, "accuracy": acc, "underdiagnosis_rate": under,
                     "with_finding": int(sick.sum())})
        auroc_curves[attribute, group], auroc_points[attribute, group] = curve, point
        accuracy[attribute, group], sizes[attribute, group] = acc, n
    for attribute in ("sex", "age"):
        members = [g for a, g in auroc_curves if a == attribute]
        point_auroc = {g: auroc_points[attribute, g] for g in members}
        acc = {g: accuracy[attribute, g] for g in members}
        size = {g: sizes[attribute, g] for g in members}
        targets = ["F"] if attribute == "sex" else members
        known = _known(meta, attribute)
        eod = float(np.mean([equalized_odds_difference(labels[known, k], predicted[known, k],
                                                       sensitive_features=_feature(meta, attribute)[known])
                             for k in range(len(LABELS))])) if len(set(_feature(meta, attribute)[known])) > 1 \
            else math.nan
        for group in targets:
            spd_curve = parity_difference({g: auroc_curves[attribute, g] for g in members}, size, group)
            low, high = percentile_ci(spd_curve, e.confidence)
            rows.append({"attribute": f"{attribute}_gap", "group": group, "n": size.get(group, 0),
                         "spd_auroc": parity_difference(point_auroc, size, group), "spd_auroc_ci_low": low,
                         "spd_auroc_ci_high": high, "spd_accuracy": parity_difference(acc, size, group),
                         "equalized_odds_difference": eod})
    return rows


def _label_mean(aurocs: np.ndarray) -> np.ndarray:
    """Mean over the labels of each row (B, L) -> (B,), NaN where no label has both classes."""
    defined = np.isfinite(aurocs)
    return np.where(defined.any(axis=1), np.nansum(aurocs, axis=1) / np.maximum(defined.sum(axis=1), 1), np.nan)


def _feature(meta: pd.DataFrame, attribute: str) -> np.ndarray:
    """Each image's sex (F, M) or age bin, None/NaN when unknown."""
    if attribute == "sex":
        return meta["sex"].astype(object).where(meta["sex"].notna(), None).to_numpy()
    return age_bin(meta["age"].astype(float)).to_numpy()


def _known(meta: pd.DataFrame, attribute: str) -> np.ndarray:
    return pd.notna(pd.Series(_feature(meta, attribute))).to_numpy()


def _comparisons(cells: list[Cell], sites: list[str], curves: dict[tuple[str, str], np.ndarray]) -> pd.DataFrame:
    """Paired one-sided p-values on mean AUROC: non-private vs DP per init, each init vs scratch, ssl vs domain."""
    rows = []
    by_knobs = {(c.train.init, c.train.epsilon, c.train.model, c.train.data_fraction, c.train.seed): c for c in cells}
    for cell in cells:
        t = cell.train
        references = []
        if math.isfinite(t.epsilon):
            references.append(("non-private better than DP", by_knobs.get((t.init, math.inf, *_rest(t))), cell))
        if t.init != "scratch":
            references.append((f"{t.init} better than scratch", cell, by_knobs.get(("scratch", t.epsilon, *_rest(t)))))
        if t.init == "ssl":     # the study's question: self-supervised against supervised domain pretraining
            references.append(("ssl better than domain", cell, by_knobs.get(("domain", t.epsilon, *_rest(t)))))
        for question, better, worse in references:
            if better is None or worse is None:
                continue
            for site in sites:
                a, b = curves[better.name, site], curves[worse.name, site]
                rows.append({"question": question, "site": site, "better": better.name, "worse": worse.name,
                             "epsilon": t.epsilon, "difference": float(np.nanmean(a - b)),
                             "p_value": paired_p_value(a, b)})
    # Columns named even when the grid pairs nothing (a single cell), so the report reads an empty table.
    return pd.DataFrame(rows, columns=["question", "site", "better", "worse", "epsilon", "difference", "p_value"])


def _rest(t: Train) -> tuple[object, ...]:
    return t.model, t.data_fraction, t.seed


def _cross_site(results: pd.DataFrame) -> pd.DataFrame:
    mean = results[(results["metric"] == "auroc") & (results["label"] == "mean")]
    return mean.pivot(index="cell", columns="site", values="value")


def _dvc_metrics(cells: list[Cell], results: pd.DataFrame, private: str) -> dict[str, object]:
    """One compact entry per cell (``dvc metrics show``/``dvc exp show``): epsilon and private test mean AUROC."""
    mean = results[(results["metric"] == "auroc") & (results["label"] == "mean")]
    out = {}
    for cell in cells:
        rows = mean[mean["cell"] == cell.name].set_index("site")
        own, external = rows.loc[private], rows.drop(private)["value"]
        eps = float(cell.privacy["epsilon"])
        out[cell.name] = {"epsilon": eps if math.isfinite(eps) else None,
                          "test_mean_auroc": round(float(own["value"]), 4),
                          "ci_low": round(float(own["ci_low"]), 4), "ci_high": round(float(own["ci_high"]), 4),
                          "external_mean_auroc": round(float(external.mean()), 4) if len(external) else None}
    return out


def _log(params: Params, cells: list[Cell], results: pd.DataFrame, private: str) -> None:
    """Aggregates to each model's train run (found by its cell tag) and the tables to an evaluate run."""
    import mlflow

    mean = results[results["label"] == "mean"]
    with stage_run(STAGE):
        client = mlflow.MlflowClient()
        for cell in cells:
            metrics = {}
            for row in mean[mean["cell"] == cell.name].itertuples():
                scope = "test" if row.site == private else f"external.{row.site}"
                metrics |= {f"{scope}.mean_auroc": row.value, f"{scope}.mean_auroc_ci_low": row.ci_low,
                            f"{scope}.mean_auroc_ci_high": row.ci_high}
            clean = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
            mlflow.log_metrics({f"{cell.name}.{k}": v for k, v in clean.items()})
            run_id = cell_run_id(cell.name, cell.folder)
            if run_id:
                for key, value in clean.items():
                    client.log_metric(run_id, key, value)
        for name in ("results.csv", "fairness.csv", "comparisons.csv", "cross_site.csv", "thresholds.json"):
            mlflow.log_artifact(str(Path(params.base.artifacts) / STAGE / name))


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.evaluate [-P evaluate.threshold=resample ...]``."""
    run_stage(STAGE, evaluate, argv)


if __name__ == "__main__":
    main()

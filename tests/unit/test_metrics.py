"""Evaluation metrics against the reference implementations: sklearn for AUROC, fairlearn for the fairness gaps."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame, equalized_odds_difference
from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve

from pipelines.config import load_params
from pipelines.data.schema import LABELS
from pipelines.evaluate import _fairness, _site_metrics
from pipelines.metrics import (
    auroc,
    bootstrap_indices,
    paired_p_value,
    percentile_ci,
    resample_counts,
    threshold_metrics,
    youden_threshold,
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_equals_sklearn_on_the_data_and_on_every_resample(ties):
    labels = RNG.integers(0, 2, 500)
    scores = RNG.random(500) + 0.3 * labels
    scores = np.round(scores, 1) if ties else scores
    assert abs(auroc(labels, scores)[0] - roc_auc_score(labels, scores)) < 1e-12
    indices = bootstrap_indices(500, 40, seed=1)
    resampled = auroc(labels, scores, resample_counts(indices, 500))
    expected = np.array([roc_auc_score(labels[i], scores[i]) for i in indices])
    np.testing.assert_allclose(resampled, expected, rtol=0, atol=1e-12)


def test_auroc_of_a_resample_without_positives_is_nan():
    labels = np.array([1, 0, 0, 0])
    counts = np.array([[0, 2, 1, 1], [1, 1, 1, 1]], dtype=np.int32)
    result = auroc(labels, np.array([0.9, 0.1, 0.2, 0.3]), counts)
    assert np.isnan(result[0]) and result[1] == 1.0


def test_resamples_are_reproducible_and_counts_match_indices():
    a, b = bootstrap_indices(300, 20, seed=5), bootstrap_indices(300, 20, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, bootstrap_indices(300, 20, seed=6))
    counts = resample_counts(a, 300)
    assert counts.sum(axis=1).tolist() == [300] * 20
    assert counts[3, a[3, 0]] == np.sum(a[3] == a[3, 0])


def test_a_perfect_classifier_has_the_interval_one_one():
    meta_labels = RNG.integers(0, 2, (200, len(LABELS)))
    e = load_params().evaluate
    counts = resample_counts(bootstrap_indices(200, 200, seed=0), 200)
    rows, curve = _site_metrics(meta_labels, meta_labels * 0.8 + 0.1, np.full(len(LABELS), 0.5), counts, e)
    mean = next(r for r in rows if r["metric"] == "auroc" and r["label"] == "mean")
    assert (mean["value"], mean["ci_low"], mean["ci_high"]) == (1.0, 1.0, 1.0)
    assert np.all(curve == 1.0)


def test_youden_threshold_maximises_tpr_minus_fpr_like_sklearn_roc_curve():
    labels = RNG.integers(0, 2, 400)
    scores = RNG.random(400) + 0.4 * labels
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    assert youden_threshold(labels, scores)[0] == thresholds[np.argmax(tpr - fpr)]
    metrics = threshold_metrics(labels, scores, youden_threshold(labels, scores)[0])
    assert metrics["sensitivity"][0] - (1 - metrics["specificity"][0]) == pytest.approx(np.max(tpr - fpr))
    assert metrics["accuracy"][0] == pytest.approx(accuracy_score(labels, scores >= youden_threshold(labels, scores)[0]))


def test_paired_p_value_counts_resamples_where_the_better_model_is_not_better():
    assert paired_p_value(np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.5, 0.85, 0.6, 0.6])) == 0.5
    assert percentile_ci(np.linspace(0, 1, 1001)) == pytest.approx((0.025, 0.975))


def _cohort(n=600):
    meta = pd.DataFrame({"sex": pd.array(RNG.choice(["F", "M"], n), dtype="string"),
                         "age": RNG.uniform(18, 95, n)})
    labels = RNG.integers(0, 2, (n, len(LABELS)))
    scores = np.clip(labels * 0.3 + RNG.random((n, len(LABELS))) * 0.7 + (meta["sex"] == "F").to_numpy()[:, None]
                     * 0.05, 0, 1)
    return meta, labels, scores


def test_sex_gaps_equal_fairlearn_on_the_same_data():
    meta, labels, scores = _cohort()
    thresholds = np.full(len(LABELS), 0.5)
    e = load_params().evaluate
    counts = resample_counts(bootstrap_indices(len(meta), 20, seed=0), len(meta))
    rows = pd.DataFrame(_fairness(meta, labels, scores, thresholds, counts, e))
    gap = rows[rows["attribute"] == "sex_gap"].iloc[0]
    sex = meta["sex"].to_numpy()
    auroc_by = [MetricFrame(metrics=roc_auc_score, y_true=labels[:, k], y_pred=scores[:, k],
                            sensitive_features=sex).by_group for k in range(len(LABELS))]
    accuracy_by = [MetricFrame(metrics=accuracy_score, y_true=labels[:, k], y_pred=scores[:, k] >= 0.5,
                               sensitive_features=sex).by_group for k in range(len(LABELS))]
    assert gap["spd_auroc"] == pytest.approx(np.mean([g["F"] - g["M"] for g in auroc_by]), abs=1e-12)
    assert gap["spd_accuracy"] == pytest.approx(np.mean([g["F"] - g["M"] for g in accuracy_by]), abs=1e-12)
    assert abs(gap["spd_auroc"]) <= np.mean([MetricFrame(metrics=roc_auc_score, y_true=labels[:, k],
                                                         y_pred=scores[:, k], sensitive_features=sex).difference()
                                             for k in range(len(LABELS))]) + 1e-12
    eod = np.mean([equalized_odds_difference(labels[:, k], scores[:, k] >= 0.5, sensitive_features=sex)
                   for k in range(len(LABELS))])
    assert gap["equalized_odds_difference"] == pytest.approx(eod, abs=1e-12)
    # and fairlearn's equalized-odds difference is max(|dTPR|, |dFPR|) between the sexes
    k, pred = 0, scores[:, 0] >= 0.5
    rates = {s: (pred[(sex == s) & (labels[:, k] == 1)].mean(), pred[(sex == s) & (labels[:, k] == 0)].mean())
             for s in ("F", "M")}
    assert equalized_odds_difference(labels[:, k], pred, sensitive_features=sex) == pytest.approx(
        max(abs(rates["F"][0] - rates["M"][0]), abs(rates["F"][1] - rates["M"][1])))


def test_age_gap_is_the_group_minus_the_size_weighted_mean_of_the_others():
    meta, labels, scores = _cohort()
    e = load_params().evaluate
    counts = resample_counts(bootstrap_indices(len(meta), 10, seed=0), len(meta))
    rows = pd.DataFrame(_fairness(meta, labels, scores, np.full(len(LABELS), 0.5), counts, e))
    groups = rows[rows["attribute"] == "age"].set_index("group")
    gap = rows[(rows["attribute"] == "age_gap") & (rows["group"] == "[30,60)")].iloc[0]
    others = groups.drop("[30,60)")
    expected = groups.loc["[30,60)", "mean_auroc"] - np.average(others["mean_auroc"], weights=others["n"])
    assert gap["spd_auroc"] == pytest.approx(expected, abs=1e-12)


def test_small_subgroups_are_flagged():
    meta, labels, scores = _cohort()
    meta.loc[:, "age"] = np.where(np.arange(len(meta)) < 12, 20.0, 65.0)   # twelve patients under 30
    labels[:12] = 0
    labels[:3] = 1
    e = load_params(overrides=["evaluate.min_subgroup_positives=5"]).evaluate
    counts = resample_counts(bootstrap_indices(len(meta), 10, seed=0), len(meta))
    rows = pd.DataFrame(_fairness(meta, labels, scores, np.full(len(LABELS), 0.5), counts, e))
    flags = rows[rows["attribute"] == "age"].set_index("group")["flagged"]
    assert flags["[0,30)"] and not flags["[60,70)"]
    assert rows[(rows["attribute"] == "age") & (rows["group"] == "[0,30)")]["min_positives"].iloc[0] == 3


def test_init_comparisons_pair_each_init_with_scratch_and_ssl_with_domain():
    from pathlib import Path

    from pipelines.cells import Cell
    from pipelines.config import load_params
    from pipelines.evaluate import _comparisons

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml",
                         ["grid.inits=[scratch, domain, ssl]", "grid.epsilons=[1, 8, inf]",
                          "pretrain.methods=[supervised, ssl]"])
    cells = [Cell(t.cell, Path(t.cell), t, {}) for t in params.grid_cells()]
    rng = np.random.default_rng(0)
    curves = {(c.name, "site"): rng.uniform(0.6, 0.7, 200) for c in cells}
    curves["ssl-8-atto-1.0-0", "site"] = curves["domain-8-atto-1.0-0", "site"] + 0.01    # better in every resample
    rows = {(r["question"], r["epsilon"]): r for r in _comparisons(cells, ["site"], curves).to_dict("records")}
    assert set(rows) == {(q, e) for e in (1, 8, math.inf) for q in ("domain better than scratch", "ssl better than scratch",
                                                                 "ssl better than domain")} | {
        ("non-private better than DP", 1), ("non-private better than DP", 8)}
    assert rows["ssl better than domain", 8]["p_value"] == 0 and rows["ssl better than domain", 8]["difference"] == (
        pytest.approx(0.01))
    assert rows["ssl better than domain", 8]["worse"] == "domain-8-atto-1.0-0"


def test_a_single_cell_grid_compares_nothing_and_the_report_reads_the_empty_table(tmp_path):
    """One grid cell has nothing to pair with: the comparisons file still has its columns (it was empty, and the
    report stage failed reading it)."""
    from pipelines.cells import Cell
    from pipelines.evaluate import _comparisons
    from pipelines.report import _drops, _init_comparisons

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml",
                         ["grid.inits=[scratch]", "grid.epsilons=[8]", "register.aliases={champion: 8}",
                          "register.private_aliases=[champion]", "audit.cells=[scratch-8-atto-1.0-0]"])
    cells = [Cell(t.cell, Path(t.cell), t, {}) for t in params.grid_cells()]
    assert len(cells) == 1
    _comparisons(cells, ["site"], {(cells[0].name, "site"): np.full(10, 0.7)}).to_csv(tmp_path / "c.csv", index=False)
    comparisons = pd.read_csv(tmp_path / "c.csv")
    main = pd.DataFrame([{"cell": cells[0].name, "init": "scratch", "epsilon": 8.0, "site": "site", "value": 0.7}])
    assert _init_comparisons(main, comparisons, "site", resamples=10).empty
    assert _drops(main, comparisons, "site", resamples=10).empty

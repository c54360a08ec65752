"""The report stage: the study's tables and figures from whatever grid the evaluate stage covered.

Tables (Markdown, HTML and CSV): init x epsilon mean AUROC [95% CI] per evaluation site, the drop from the
non-private model of the same init (with the paired p-value), fairness gaps against epsilon, the cross-site
matrix, and, when the grid sweeps them, mean AUROC against the data fraction and the model size. Figures (PNG):
mean AUROC against epsilon, the cross-site heatmap, ROC curves on the private test split, fairness gaps against
epsilon and epsilon spent per epoch. Everything lands in ``<artifacts>/report/`` (declared as DVC plots) and in
the stage's MLflow run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from pipelines.atomic import atomic_folder  # noqa: E402
from pipelines.config import Params  # noqa: E402
from pipelines.data.schema import LABELS  # noqa: E402
from pipelines.data.store import open_site  # noqa: E402
from pipelines.stage import StageError, run_stage  # noqa: E402
from pipelines.tracking import stage_run  # noqa: E402

STAGE = "report"
RESULTS_TABLE = "results_table.md"   # what `make demo` prints and copies into README.md
README_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


def report(params: Params) -> Path:
    """Builds the report from the evaluate stage's tables.

    Returns:
        The Markdown report's path.

    Raises:
        StageError: the evaluate stage has not run.
    """
    evaluated = Path(params.base.artifacts) / "evaluate"
    if not (evaluated / "results.csv").is_file():
        raise StageError(f"no evaluation results in {evaluated}: run `dvc repro evaluate` first")
    results = pd.read_csv(evaluated / "results.csv")
    fairness = pd.read_csv(evaluated / "fairness.csv")
    comparisons = pd.read_csv(evaluated / "comparisons.csv")
    private = params.private_site()
    mean = results[(results["metric"] == "auroc") & (results["label"] == "mean")].copy()
    main = _main_slice(mean, params)
    sections: list[tuple[str, str, pd.DataFrame]] = []   # (title, CSV file stem, table)
    with atomic_folder(Path(params.base.artifacts) / STAGE) as out:
        for site in [private] + sorted(set(mean["site"]) - {private}):
            sections.append((f"Mean AUROC [95% CI] on {site} (test)", f"auroc_{site}",
                             _init_by_epsilon(main[main["site"] == site])))
        sections.append(("Drop from the non-private model of the same init (private test)", "drop_from_non_private",
                         _drops(main[main["site"] == private], comparisons, private)))
        sections.append(("Initializations compared (private test, paired bootstrap, one-sided)", "init_comparisons",
                         _init_comparisons(main, comparisons, private)))
        gaps = _fairness_gaps(fairness[fairness["site"] == private])
        sections.append(("Fairness gaps on the private test split", "fairness_gaps", gaps))
        cross = mean.pivot(index="cell", columns="site", values="value").round(3)
        sections.append(("Cross-site mean AUROC", "cross_site", cross))
        for knob, title in (("data_fraction", "Data scale"), ("model", "Model capacity")):
            if mean[knob].nunique() > 1:
                sweep = mean[mean["site"] == private].pivot_table(index=["init", "epsilon"], columns=knob,
                                                                  values="value").round(3)
                sections.append((f"{title}: mean AUROC on the private test split", f"{knob}_sweep", sweep))
                _plot_sweep(mean[mean["site"] == private], knob, out / f"{knob}_sweep.png")
        _plot_auroc_vs_epsilon(main[main["site"] == private], out / "auroc_vs_epsilon.png")
        _plot_heatmap(cross, out / "cross_site_heatmap.png")
        _plot_roc(params, main[main["site"] == private]["cell"].unique(), evaluated, out / "roc_private_test.png")
        _plot_fairness(gaps, out / "fairness_vs_epsilon.png")
        history = _epsilon_history(params, main["cell"].unique())
        history.to_csv(out / "epsilon_per_epoch.csv", index=False)
        _plot_epsilon(history, out / "epsilon_per_epoch.png")
        for _, stem, table in sections:
            table.to_csv(out / f"{stem}.csv")
        threshold = results["threshold"].iloc[0]
        (out / RESULTS_TABLE).write_text(_results_table(main[main["site"] == private], private, params.train.delta,
                                                        _data_set_epsilon(params, mean["cell"].unique())))
        (out / "report.md").write_text(_markdown(sections, threshold, out))
        (out / "report.html").write_text(_html(sections, threshold, out))
    path = Path(params.base.artifacts) / STAGE / "report.md"
    with stage_run(STAGE):
        import mlflow

        mlflow.log_artifacts(str(path.parent), artifact_path="report")
    print(f"report: {path} (+ report.html, CSV tables and {len(list(path.parent.glob('*.png')))} figures)",
          file=sys.stderr)
    return path


def _main_slice(mean: pd.DataFrame, params: Params) -> pd.DataFrame:
    """The init x epsilon grid at the first model size, the largest data fraction and the first seed."""
    g = params.grid
    return mean[(mean["model"] == g.models[0]) & (mean["data_fraction"] == max(g.data_fractions))
                & (mean["seed"] == g.seeds[0])]


def _eps_label(eps: float) -> str:
    return "non-private" if math.isinf(eps) else f"ε={eps:g}"


def _init_by_epsilon(rows: pd.DataFrame) -> pd.DataFrame:
    table = rows.assign(text=[f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in
                              zip(rows["value"], rows["ci_low"], rows["ci_high"], strict=True)])
    table = table.pivot(index="init", columns="epsilon", values="text")
    table = table[sorted(table.columns)]
    table.columns = [_eps_label(c) for c in table.columns]
    return table


def _data_set_epsilon(params: Params, cells: np.ndarray) -> float:
    """What every private run recorded on the private data set composes to (the largest, i.e. latest, record)."""
    spent = [json.loads((Path(params.base.artifacts) / "train" / cell / "privacy.json").read_text()).get(
        "data_set_epsilon", "inf") for cell in cells]
    finite = [float(e) for e in spent if math.isfinite(float(e))]
    return max(finite, default=float("nan"))


def _results_table(rows: pd.DataFrame, private: str, delta: float, data_set_epsilon: float) -> str:
    """The headline table: init x epsilon mean AUROC [95% CI] on the private test split, with epsilon spent."""
    table = _init_by_epsilon(rows)
    spent = rows.groupby("epsilon")["epsilon_spent"].max()
    # Rounded up: a shortened epsilon must never look smaller than the one spent.
    note = ", ".join(f"{_eps_label(eps)}: {math.ceil(float(value) * 1000) / 1000:.3f}" for eps, value in spent.items()
                     if math.isfinite(eps))
    total = (f"; every private run on this data set so far composes to ε = "
             f"{math.ceil(data_set_epsilon * 1000) / 1000:.3f}" if math.isfinite(data_set_epsilon) else "")
    return (f"Mean AUROC [95% bootstrap CI] on the {private} test split, by initialization and target ε "
            f"(δ = {delta:g}; ε spent {note}{total}).\n\n{table.to_markdown()}\n")


def update_readme(params: Params, readme: Path = Path("README.md")) -> None:
    """Replaces the results table between the README's markers with the report's (regenerated, never typed).

    Raises:
        StageError: no report yet, or the README lacks the markers.
    """
    table = Path(params.base.artifacts) / STAGE / RESULTS_TABLE
    if not table.is_file():
        raise StageError(f"{table} is missing: run the report stage first")
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise StageError(f"{readme} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    readme.write_text(f"{head}{start}\n{table.read_text()}{end}{rest.split(end, 1)[1]}")


def _drops(rows: pd.DataFrame, comparisons: pd.DataFrame, private: str) -> pd.DataFrame:
    out = []
    for row in rows[np.isfinite(rows["epsilon"])].itertuples():
        reference = rows[(rows["init"] == row.init) & np.isinf(rows["epsilon"])]
        if reference.empty:
            continue
        test = comparisons[(comparisons["site"] == private) & (comparisons["worse"] == row.cell)
                           & (comparisons["question"] == "non-private better than DP")]
        out.append({"init": row.init, "epsilon": row.epsilon, "dp_mean_auroc": round(row.value, 3),
                    "non_private_mean_auroc": round(float(reference["value"].iloc[0]), 3),
                    "drop": round(float(reference["value"].iloc[0]) - row.value, 3),
                    "p_value": float(test["p_value"].iloc[0]) if len(test) else math.nan})
    return pd.DataFrame(out)


def _init_comparisons(main: pd.DataFrame, comparisons: pd.DataFrame, private: str) -> pd.DataFrame:
    """Each init against scratch, and ssl against domain, at each epsilon: mean AUROC difference and p-value."""
    cells = set(main["cell"])
    rows = comparisons[(comparisons["site"] == private) & (comparisons["question"] != "non-private better than DP")
                       & comparisons["better"].isin(cells) & comparisons["worse"].isin(cells)]
    return pd.DataFrame({"question": rows["question"], "epsilon": rows["epsilon"],
                         "difference": rows["difference"].round(3), "p_value": rows["p_value"].round(3)}
                        ).set_index(["question", "epsilon"])


def _fairness_gaps(fairness: pd.DataFrame) -> pd.DataFrame:
    """Per cell: the sex gap (female minus male mean AUROC, CI), the largest age gap, and the worst flags."""
    out = []
    for cell, rows in fairness.groupby("cell", sort=False):
        sex = rows[rows["attribute"] == "sex_gap"]
        age = rows[rows["attribute"] == "age_gap"]
        groups = rows[rows["attribute"].isin(["sex", "age"])]
        worst_age = age.loc[age["spd_auroc"].abs().idxmax()] if age["spd_auroc"].notna().any() else None
        out.append({"cell": cell, "init": rows["init"].iloc[0], "epsilon": rows["epsilon"].iloc[0],
                    "sex_spd_auroc": sex["spd_auroc"].iloc[0] if len(sex) else math.nan,
                    "sex_spd_ci": f"[{sex['spd_auroc_ci_low'].iloc[0]:.3f}, {sex['spd_auroc_ci_high'].iloc[0]:.3f}]"
                    if len(sex) else "",
                    "sex_equalized_odds_difference": sex["equalized_odds_difference"].iloc[0] if len(sex) else math.nan,
                    "largest_age_spd_auroc": worst_age["spd_auroc"] if worst_age is not None else math.nan,
                    "largest_age_gap_group": worst_age["group"] if worst_age is not None else "",
                    "underdiagnosis_female": _group_value(groups, "F", "underdiagnosis_rate"),
                    "underdiagnosis_male": _group_value(groups, "M", "underdiagnosis_rate"),
                    "flagged_groups": ", ".join(groups[groups["flagged"].astype(bool)]["group"])})
    return pd.DataFrame(out).round(4)


def _group_value(groups: pd.DataFrame, group: str, column: str) -> float:
    match = groups[groups["group"] == group]
    return float(match[column].iloc[0]) if len(match) else math.nan


def _epsilon_history(params: Params, cells: np.ndarray) -> pd.DataFrame:
    rows = []
    for cell in cells:
        history = Path(params.base.artifacts) / "train" / cell / "history.json"
        if history.is_file():
            rows += [{"cell": cell, "epoch": h["epoch"], "epsilon": h["epsilon"]}
                     for h in json.loads(history.read_text()) if math.isfinite(h["epsilon"])]
    return pd.DataFrame(rows, columns=["cell", "epoch", "epsilon"])


def _plot_auroc_vs_epsilon(rows: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    finite = rows[np.isfinite(rows["epsilon"])]
    for init, group in finite.groupby("init"):
        group = group.sort_values("epsilon")
        ax.errorbar(group["epsilon"], group["value"], capsize=3, marker="o", label=init,
                    yerr=[group["value"] - group["ci_low"], group["ci_high"] - group["value"]])
        baseline = rows[(rows["init"] == init) & np.isinf(rows["epsilon"])]
        if len(baseline):
            ax.axhline(float(baseline["value"].iloc[0]), linestyle="--", linewidth=1,
                       color=ax.lines[-1].get_color(), label=f"{init} non-private")
    ax.set(ylabel="mean AUROC (private test, 95% CI)", title="Utility against privacy")
    _epsilon_axis(ax, finite["epsilon"])
    ax.legend(fontsize=8)
    _save(fig, path)


def _epsilon_axis(ax: plt.Axes, epsilons: pd.Series) -> None:
    """A log ε axis ticked at the grid's values."""
    values = sorted(set(epsilons))
    ax.set(xscale="log", xlabel="ε (target)")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()


def _plot_heatmap(cross: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * cross.shape[1], 1 + 0.45 * cross.shape[0]))
    image = ax.imshow(cross.to_numpy(dtype=float), cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cross.shape[1]), [c.removeprefix("synthetic-") for c in cross.columns], rotation=30,
                  ha="right")
    ax.set_yticks(range(cross.shape[0]), cross.index)
    for (i, j), value in np.ndenumerate(cross.to_numpy(dtype=float)):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.75 else "black",
                fontsize=8)
    fig.colorbar(image, ax=ax, label="mean AUROC")
    ax.set_title("Cross-site mean AUROC")
    _save(fig, path)


def _plot_roc(params: Params, cells: np.ndarray, evaluated: Path, path: Path) -> None:
    private = params.private_site()
    _, meta = open_site(Path(params.base.artifacts) / "prepare" / private).split("test")
    labels = meta[list(LABELS)].to_numpy()
    fig, axes = plt.subplots(1, len(LABELS), figsize=(3.2 * len(LABELS), 3.4), sharey=True)
    for cell in cells:
        scores = np.load(evaluated / "predictions" / private / f"{cell}.npy")
        for k, ax in enumerate(axes):
            if 0 < labels[:, k].sum() < len(labels):
                fpr, tpr, _ = roc_curve(labels[:, k], scores[:, k])
                ax.plot(fpr, tpr, linewidth=1, label=cell)
    for k, ax in enumerate(axes):
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle=":")
        ax.set(title=LABELS[k], xlabel="false positive rate")
    axes[0].set_ylabel("true positive rate")
    axes[-1].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"ROC curves on {private} (test)")
    _save(fig, path)


def _plot_fairness(gaps: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    finite = gaps[np.isfinite(gaps["epsilon"])]
    for init, group in finite.groupby("init"):
        group = group.sort_values("epsilon")
        axes[0].plot(group["epsilon"], group["sex_spd_auroc"], marker="o", label=init)
        axes[1].plot(group["epsilon"], group["largest_age_spd_auroc"], marker="o", label=init)
    for ax, title in zip(axes, ("sex: female - male mean AUROC", "largest age-group gap in mean AUROC"),
                         strict=True):
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set(title=title)
        _epsilon_axis(ax, finite["epsilon"])
        ax.legend(fontsize=8)
    _save(fig, path)


def _plot_epsilon(history: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for cell, rows in history.groupby("cell"):
        ax.plot(rows["epoch"], rows["epsilon"], marker="o", label=cell)
    ax.set(xlabel="epoch", ylabel="ε spent (δ fixed)", title="Privacy spent per epoch")
    if len(history):
        ax.legend(fontsize=7)
    _save(fig, path)


def _plot_sweep(rows: pd.DataFrame, knob: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for (init, eps), group in rows.groupby(["init", "epsilon"]):
        group = group.sort_values(knob)
        ax.plot(group[knob].astype(str), group["value"], marker="o", label=f"{init} {_eps_label(eps)}")
    ax.set(xlabel=knob, ylabel="mean AUROC (private test)", title=f"Mean AUROC by {knob}")
    ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(sections: list[tuple[str, str, pd.DataFrame]], threshold: str, out: Path) -> str:
    lines = ["# DP-CXR study report", "", f"Thresholds for threshold metrics: `{threshold}` "
             "(val = Youden's J on the private val split, then fixed; resample = re-chosen per test resample).", ""]
    for title, _, table in sections:
        lines += [f"## {title}", "", table.to_markdown() if len(table) else "(nothing to show)", ""]
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in sorted(p.name for p in out.glob("*.png"))]
    return "\n".join(lines) + "\n"


def _html(sections: list[tuple[str, str, pd.DataFrame]], threshold: str, out: Path) -> str:
    body = [f"<h1>DP-CXR study report</h1><p>Thresholds: <code>{threshold}</code></p>"]
    for title, _, table in sections:
        body.append(f"<h2>{title}</h2>" + (table.to_html(border=0) if len(table) else "<p>(nothing to show)</p>"))
    body += [f'<h2>{png.stem.replace("_", " ")}</h2><img src="{png.name}" alt="{png.stem}">'
             for png in sorted(out.glob("*.png"))]
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}" \
            "td,th{padding:2px 8px;border-bottom:1px solid #ddd}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>DP-CXR report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.report`` builds the report; ``--update-readme`` copies its table into README.md."""
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--update-readme", action="store_true",
                            help="copy the results table of the last report into README.md instead of reporting")

    run_stage(STAGE, lambda params, args: (update_readme if args.update_readme else report)(params), argv, flags)


if __name__ == "__main__":
    main()

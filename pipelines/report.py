"""The report stage: the study's results section, built from whatever grid the evaluate stage covered.

``report.html`` (and the same text as ``report.md``) reads as a results section: an introduction (data, grid,
privacy settings and the guarantee), then numbered tables and figures, each with a caption. Tables (also CSV):
init x epsilon mean AUROC [95% CI] per evaluation site, the privacy settings of each private cell, the drop from
the non-private model of the same init (paired p-value), the initializations compared (paired p-values), fairness
gaps, the cross-site matrix and, when the grid sweeps them, mean AUROC against the data fraction and the model
size. Figures (PNG): mean AUROC against epsilon, the cross-site heatmap, ROC curves on the private test split,
fairness gaps against epsilon and epsilon spent per epoch. Everything lands in ``<artifacts>/report/`` (declared
as DVC plots) and in the stage's MLflow run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from models.record import epsilon_up  # noqa: E402
from pipelines.atomic import atomic_folder  # noqa: E402
from pipelines.config import Params  # noqa: E402
from pipelines.data.schema import LABELS  # noqa: E402
from pipelines.data.store import open_site  # noqa: E402
from pipelines.stage import StageError, run_stage  # noqa: E402
from pipelines.tracking import stage_run  # noqa: E402

STAGE = "report"
RESULTS_TABLE = "results_table.md"   # what `make demo` prints and copies into README.md
README_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


@dataclass(frozen=True)
class Table:
    """A numbered table of the report: its title, caption, CSV file stem and rows (plain columns, no index)."""

    title: str
    caption: str
    stem: str
    frame: pd.DataFrame


@dataclass(frozen=True)
class Figure:
    """A numbered figure of the report: its title in words, caption and PNG file name."""

    title: str
    caption: str
    file: str


def report(params: Params) -> Path:
    """Builds the report from the evaluate stage's tables.

    Returns:
        The Markdown report's path.

    Raises:
        StageError: the evaluate stage has not run.
    """
    artifacts = Path(params.base.artifacts)
    evaluated = artifacts / "evaluate"
    if not (evaluated / "results.csv").is_file():
        raise StageError(f"no evaluation results in {evaluated}: run `dvc repro evaluate` first")
    results = pd.read_csv(evaluated / "results.csv")
    fairness = pd.read_csv(evaluated / "fairness.csv")
    comparisons = pd.read_csv(evaluated / "comparisons.csv")
    private = params.private_site()
    mean = results[(results["metric"] == "auroc") & (results["label"] == "mean")].copy()
    main = _main_slice(mean, params)
    on_private = main[main["site"] == private]
    records = {cell: json.loads((artifacts / "train" / cell / "privacy.json").read_text())
               for cell in mean["cell"].unique()}
    prepared = json.loads((artifacts / "prepare" / "report.json").read_text())
    with atomic_folder(artifacts / STAGE) as out:
        tables = [Table(f"Mean AUROC on {site} (test split)", _AUROC_CAPTION.format(site=site), f"auroc_{site}",
                        _init_by_epsilon(main[main["site"] == site]))
                  for site in [private] + sorted(set(mean["site"]) - {private})]
        tables.append(Table("Privacy settings of each private model", _PRIVACY_CAPTION, "privacy_settings",
                            _privacy_settings(on_private, records)))
        tables.append(Table("The cost of privacy", _DROP_CAPTION, "drop_from_non_private",
                            _drops(on_private, comparisons, private, params.evaluate.resamples)))
        compared = _init_comparisons(main, comparisons, private, params.evaluate.resamples)
        tables.append(Table("Initializations compared", _COMPARED_CAPTION, "init_comparisons", compared))
        gaps = _fairness_gaps(fairness[fairness["site"] == private])
        tables.append(Table("Fairness gaps on the private test split", _FAIRNESS_CAPTION, "fairness_gaps",
                            _fairness_table(gaps)))
        cross = mean.pivot(index="cell", columns="site", values="value").round(3)
        tables.append(Table("Mean AUROC across sites", _CROSS_CAPTION, "cross_site",
                            cross.rename_axis(index="model", columns=None).reset_index()))
        figures = [
            Figure("Utility against privacy", _AUROC_FIGURE, _plot_auroc_vs_epsilon(on_private, out)),
            Figure("Mean AUROC across sites", _HEATMAP_FIGURE, _plot_heatmap(cross, out)),
            Figure(f"ROC curves on {private} (test split)", _ROC_FIGURE,
                   _plot_roc(params, on_private["cell"].unique(), evaluated, out)),
            Figure("Fairness gaps against privacy", _FAIRNESS_FIGURE, _plot_fairness(gaps, out))]
        history = _epsilon_history(params, on_private[np.isfinite(on_private["epsilon"])]["cell"].unique())
        history.to_csv(out / "epsilon_per_epoch.csv", index=False)
        figures.append(Figure("Privacy spent during training", _EPSILON_FIGURE, _plot_epsilon(history, out)))
        for knob, title in (("data_fraction", "Data scale"), ("model", "Model capacity")):
            if mean[knob].nunique() > 1:
                rows = mean[mean["site"] == private]
                sweep = rows.pivot_table(index=["init", "epsilon"], columns=knob, values="value").round(3)
                sweep.columns = [str(c) for c in sweep.columns]
                tables.append(Table(f"{title}: mean AUROC on the private test split",
                                    _SWEEP_CAPTION.format(knob=_KNOB_WORDS[knob]), f"{knob}_sweep",
                                    _with_epsilon_labels(sweep.reset_index())))
                figures.append(Figure(f"{title}: mean AUROC against the {_KNOB_WORDS[knob]}",
                                      _SWEEP_CAPTION.format(knob=_KNOB_WORDS[knob]), _plot_sweep(rows, knob, out)))
        for table in tables:
            table.frame.to_csv(out / f"{table.stem}.csv", index=False)
        tables = [table for table in tables if len(table.frame)]   # e.g. no init to compare: no table, no number
        data_set_epsilon = _data_set_epsilon(records)
        intro = _introduction(params, prepared, on_private, records, data_set_epsilon)
        threshold = str(results["threshold"].iloc[0])
        (out / RESULTS_TABLE).write_text(_results_table(on_private, compared, private, records, data_set_epsilon))
        (out / "report.md").write_text(_markdown(intro, threshold, tables, figures))
        (out / "report.html").write_text(_html(intro, threshold, tables, figures))
    path = artifacts / STAGE / "report.md"
    with stage_run(STAGE):
        import mlflow

        mlflow.log_artifacts(str(path.parent), artifact_path="report")
    print(f"report: {path} (+ report.html, {len(tables)} tables as CSV and {len(figures)} figures)", file=sys.stderr)
    return path


_AUROC_CAPTION = ("Mean AUROC over the five findings on the {site} test split, with its 95% bootstrap confidence "
                  "interval (resampling the test images, the same resamples for every model), for each "
                  "initialization (rows) and target ε (columns).")
_PRIVACY_CAPTION = ("What each private model of the grid spent: target and accounted ε (at the δ shown), the "
                    "Gaussian noise multiplier σ, the Poisson sampling rate q, the number of DP-SGD steps and the "
                    "per-example clipping norm C.")
_DROP_CAPTION = ("Mean AUROC on the private test split of each DP model against the non-private model of the same "
                 "initialization; p: paired one-sided bootstrap p-value that the non-private model is better.")
_COMPARED_CAPTION = ("Mean AUROC difference on the private test split between two initializations trained at the "
                     "same ε (positive: the first is better), with the paired one-sided bootstrap p-value.")
_FAIRNESS_CAPTION = ("Per model, on the private test split: the sex gap (female minus male mean AUROC, 95% CI), "
                     "the equalized-odds difference by sex, the largest age-group gap in mean AUROC and the group "
                     "it concerns, the underdiagnosis rates of women and men, and the groups flagged as worse off.")
_CROSS_CAPTION = ("Mean AUROC of every model (rows) on every site's test split (columns): the private site and the "
                  "external sites, whose images the models never saw.")
_SWEEP_CAPTION = "Mean AUROC on the private test split against the {knob}, per initialization and target ε."
_KNOB_WORDS = {"data_fraction": "share of the private training patients", "model": "model size"}
_AUROC_FIGURE = ("Mean AUROC on the private test split against the target ε (log scale) with 95% bootstrap "
                 "intervals; dashed lines: the non-private model of the same initialization.")
_HEATMAP_FIGURE = "Mean AUROC of every model (rows) on every site's test split (columns)."
_ROC_FIGURE = "ROC curve of every model of the grid on the private test split, one panel per finding."
_FAIRNESS_FIGURE = ("Left: female minus male mean AUROC; right: the largest gap between an age group and the rest, "
                    "against the target ε, per initialization. Zero is no gap.")
_EPSILON_FIGURE = "ε spent after each epoch of every private model, as accounted during training (δ fixed)."


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
    return table.reset_index()


def _with_epsilon_labels(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(epsilon=[_eps_label(e) for e in frame["epsilon"]]).rename(columns={"epsilon": "target ε"})


def _data_set_epsilon(records: dict[str, dict]) -> float:
    """What every private run recorded on the private data set composes to (the largest, i.e. latest, record)."""
    finite = [float(r.get("data_set_epsilon", "inf")) for r in records.values()]
    return max((e for e in finite if math.isfinite(e)), default=float("nan"))


def _privacy_settings(rows: pd.DataFrame, records: dict[str, dict]) -> pd.DataFrame:
    out = []
    for row in rows[np.isfinite(rows["epsilon"])].sort_values(["epsilon", "init"]).itertuples():
        record = records[row.cell]
        out.append({"model": row.cell, "target ε": f"{row.epsilon:g}", "ε spent": epsilon_up(record["epsilon"], 3),
                    "δ": f"{float(record['delta']):g}", "σ": round(float(record["noise_multiplier"]), 3),
                    "q": round(float(record["sample_rate"]), 4), "steps": int(record["steps"]),
                    "C": float(record["max_grad_norm"])})
    return pd.DataFrame(out)


def _results_table(rows: pd.DataFrame, compared: pd.DataFrame, private: str, records: dict[str, dict],
                   data_set_epsilon: float) -> str:
    """The headline: init x epsilon mean AUROC [95% CI] on the private test split, epsilon spent, the comparisons."""
    private_records = [records[c] for c in rows["cell"] if math.isfinite(float(records[c]["epsilon"]))]
    delta = f"{float(private_records[0]['delta']):g}" if private_records else "none"
    spent = rows.groupby("epsilon")["epsilon_spent"].max()
    note = ", ".join(f"{_eps_label(eps)}: {epsilon_up(value, 3)}" for eps, value in spent.items() if math.isfinite(eps))
    total = (f"; every private run on this data set so far composes to ε = {epsilon_up(data_set_epsilon, 3)}"
             if math.isfinite(data_set_epsilon) else "")
    text = (f"Mean AUROC [95% bootstrap CI] on the {private} test split, by initialization and target ε "
            f"(δ = {delta}; ε spent {note}{total}).\n\n{_init_by_epsilon(rows).to_markdown(index=False)}\n")
    if len(compared):
        text += ("\nPaired comparisons on the same test images (difference in mean AUROC, one-sided bootstrap p):"
                 f"\n\n{compared.to_markdown(index=False)}\n")
    return text


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


def _drops(rows: pd.DataFrame, comparisons: pd.DataFrame, private: str, resamples: int) -> pd.DataFrame:
    out = []
    for row in rows[np.isfinite(rows["epsilon"])].sort_values(["init", "epsilon"]).itertuples():
        reference = rows[(rows["init"] == row.init) & np.isinf(rows["epsilon"])]
        if reference.empty:
            continue
        test = comparisons[(comparisons["site"] == private) & (comparisons["worse"] == row.cell)
                           & (comparisons["question"] == "non-private better than DP")]
        non_private = float(reference["value"].iloc[0])
        out.append({"init": row.init, "target ε": f"{row.epsilon:g}", "DP mean AUROC": round(row.value, 3),
                    "non-private mean AUROC": round(non_private, 3), "drop": round(non_private - row.value, 3),
                    "p": _p_text(float(test["p_value"].iloc[0]) if len(test) else math.nan, resamples)})
    return pd.DataFrame(out)


def _init_comparisons(main: pd.DataFrame, comparisons: pd.DataFrame, private: str,
                      resamples: int) -> pd.DataFrame:
    """Each init against scratch, and ssl against domain, at each epsilon: mean AUROC difference and p-value."""
    cells = set(main["cell"])
    rows = comparisons[(comparisons["site"] == private) & (comparisons["question"] != "non-private better than DP")
                       & comparisons["better"].isin(cells) & comparisons["worse"].isin(cells)]
    rows = rows.sort_values(["question", "epsilon"])
    return pd.DataFrame({"comparison": rows["question"], "target ε": [_eps_label(e) for e in rows["epsilon"]],
                         "difference": rows["difference"].round(3),
                         "p": [_p_text(p, resamples) for p in rows["p_value"]]})


def _p_text(p: float, resamples: int) -> str:
    """A bootstrap p-value as far as the resamples resolve it: 0 of 1,000 resamples is p < 0.001, not p = 0."""
    if math.isnan(p):
        return ""
    return f"< {1 / resamples:.3g}" if p == 0 else f"{p:.3f}"


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


def _fairness_table(gaps: pd.DataFrame) -> pd.DataFrame:
    """The fairness gaps with short column names in words, three decimals."""
    return gaps.drop(columns=["init", "epsilon"]).round(3).rename(columns={
        "cell": "model", "sex_spd_auroc": "sex gap (F − M)", "sex_spd_ci": "sex gap 95% CI",
        "sex_equalized_odds_difference": "sex equalized-odds difference",
        "largest_age_spd_auroc": "largest age gap", "largest_age_gap_group": "age group",
        "underdiagnosis_female": "underdiagnosis F", "underdiagnosis_male": "underdiagnosis M",
        "flagged_groups": "flagged groups"})


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


def _plot_auroc_vs_epsilon(rows: pd.DataFrame, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
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
    _legend_outside(ax)
    return _save(fig, out / "auroc_vs_epsilon.png")


def _epsilon_axis(ax: plt.Axes, epsilons: pd.Series) -> None:
    """A log ε axis ticked at the grid's values."""
    values = sorted(set(epsilons))
    ax.set(xscale="log", xlabel="ε (target)")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()


def _legend_outside(ax: plt.Axes, fontsize: int = 8) -> None:
    """The legend right of the axes, where it cannot cover a curve."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def _plot_heatmap(cross: pd.DataFrame, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * cross.shape[1], 1 + 0.45 * cross.shape[0]))
    image = ax.imshow(cross.to_numpy(dtype=float), cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cross.shape[1]), [c.removeprefix("synthetic-") for c in cross.columns], rotation=30,
                  ha="right")
    ax.set_yticks(range(cross.shape[0]), cross.index)
    for (i, j), value in np.ndenumerate(cross.to_numpy(dtype=float)):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.75 else "black",
                fontsize=8)
    fig.colorbar(image, ax=ax, label="mean AUROC")
    ax.set_title("Mean AUROC across sites")
    return _save(fig, out / "cross_site_heatmap.png")


def _plot_roc(params: Params, cells: np.ndarray, evaluated: Path, out: Path) -> str:
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
        ax.set(title=LABELS[k].replace("_", " "), xlabel="false positive rate")
    axes[0].set_ylabel("true positive rate")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(len(names), 5))
    fig.suptitle(f"ROC curves on {private} (test split)", y=1.03)
    return _save(fig, out / "roc_private_test.png")


def _plot_fairness(gaps: pd.DataFrame, out: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    finite = gaps[np.isfinite(gaps["epsilon"])]
    for init, group in finite.groupby("init"):
        group = group.sort_values("epsilon")
        axes[0].plot(group["epsilon"], group["sex_spd_auroc"], marker="o", label=init)
        axes[1].plot(group["epsilon"], group["largest_age_spd_auroc"], marker="o", label=init)
    for ax, title in zip(axes, ("Sex: female minus male mean AUROC", "Largest age-group gap in mean AUROC"),
                         strict=True):
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set(title=title, ylabel="gap in mean AUROC")
        _epsilon_axis(ax, finite["epsilon"])
    _legend_outside(axes[1])
    return _save(fig, out / "fairness_vs_epsilon.png")


def _plot_epsilon(history: pd.DataFrame, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    # Cells with the same target share sigma, q and steps, so their curves coincide: the styles keep each visible.
    for k, (cell, rows) in enumerate(history.groupby("cell")):
        ax.plot(rows["epoch"], rows["epsilon"], marker="os^vDx"[k % 6], linestyle=("-", "--", ":")[k % 3],
                markersize=7 - k % 3 * 1.5, label=cell)
    ax.set(xlabel="epoch", ylabel="ε spent (δ fixed)", title="Privacy spent during training")
    _legend_outside(ax, fontsize=7)
    return _save(fig, out / "epsilon_per_epoch.png")


def _plot_sweep(rows: pd.DataFrame, knob: str, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for (init, eps), group in rows.groupby(["init", "epsilon"]):
        group = group.sort_values(knob)
        ax.plot(group[knob].astype(str), group["value"], marker="o", label=f"{init} {_eps_label(eps)}")
    ax.set(xlabel=_KNOB_WORDS[knob], ylabel="mean AUROC (private test)",
           title=f"Mean AUROC against the {_KNOB_WORDS[knob]}")
    _legend_outside(ax, fontsize=7)
    return _save(fig, out / f"{knob}_sweep.png")


def _save(fig: plt.Figure, path: Path) -> str:
    # bbox_inches="tight" keeps the legends placed outside the axes inside the image.
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


_INIT_WORDS = {"scratch": "random initialization",
               "domain": "supervised pretraining on the public chest X-ray source",
               "ssl": "self-supervised pretraining on the public source's images alone, without a label",
               "imagenet": "supervised ImageNet weights", "dinov3": "DINOv3 self-supervised weights"}


def _introduction(params: Params, prepared: dict, rows: pd.DataFrame, records: dict[str, dict],
                  data_set_epsilon: float) -> list[str]:
    """The paragraphs before the tables: data, grid, privacy settings and the guarantee."""
    sites = prepared["sites"]
    private = params.private_site()
    own = sites[private]["splits"]
    external = sorted(name for name, site in sites.items() if site["role"] == "external")
    public = [name for name, site in sites.items() if site["role"] == "public"]
    grid = params.grid
    inits = sorted(set(rows["init"]), key=grid.inits.index)
    data = (f"Every model is trained on the private site {private}: {own.get('train', 0):,} training, "
            f"{own.get('val', 0):,} validation and {own.get('test', 0):,} test images of "
            f"{sites[private]['patients']:,} patients (frontal views at {prepared['image_size']} px, splits by "
            f"patient). " + (f"{len(external)} external sites ({', '.join(external)}) test the models on images "
                             "from other hospitals that they never saw. " if external else "")
            + (f"The public source {public[0]} ({sites[public[0]]['splits'].get('train', 0):,} training images) is "
               "used only for non-private pretraining. " if public else ""))
    initializations = "; ".join(f"{init}: {_INIT_WORDS.get(init.split(':')[0], init)}" for init in inits)
    targets = sorted(set(rows["epsilon"]))
    design = (f"The grid: initializations {', '.join(inits)} ({initializations}) × target ε "
              f"{', '.join('∞ (non-private)' if math.isinf(e) else f'{e:g}' for e in targets)}, "
              f"model {grid.models[0]}, all "
              f"training patients, seed {grid.seeds[0]}; tables and figures show this slice unless they say "
              "otherwise. Confidence intervals and p-values come from a paired bootstrap over the same test "
              "resamples for every model.")
    private_records = [records[c] for c in rows["cell"] if math.isfinite(float(records[c]["epsilon"]))]
    if not private_records:
        return [data, design, "No model of this grid was trained with differential privacy."]
    r = private_records[0]
    unit = r["unit"]
    seed = ("The noise and the Poisson sampling are drawn from a secret seed that is never stored."
            if all(x["noise_seed"] == "secret" for x in private_records) else
            "WARNING: some models were trained with a public noise seed (train.reproducible): they have NO DP "
            "guarantee against anyone who knows it.")
    guarantee = (f"Privacy: each private model is (ε, δ)-differentially private for one {unit} (add/remove: two "
                 f"training sets differ by one {unit}) with δ = {float(r['delta']):g} and the ε of the privacy "
                 f"settings table, accounted by the {r['accountant'].upper()} accountant over "
                 f"{r['epochs']} epochs of Poisson-subsampled DP-SGD with per-example clipping at C = "
                 f"{float(r['max_grad_norm']):g}. {seed} The guarantee covers every intermediate model and "
                 "checkpoint, not only the final weights; it does not cover the private validation split (which "
                 "chose the epoch and the thresholds), the test split, the public pretraining data or the site "
                 f"metadata used to prepare the data. A patient with k images is protected at k·ε."
                 + (f" Every private run recorded on this data set so far composes to ε = "
                    f"{epsilon_up(data_set_epsilon, 3)} at the same δ." if math.isfinite(data_set_epsilon) else ""))
    return [data, design, guarantee]


_THRESHOLDS = {"val": "chosen by Youden's J on the private validation split, then fixed",
               "resample": "re-chosen inside each test resample"}


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    """Column names in words: no underscores, so a narrow page can wrap them."""
    return frame.rename(columns=lambda c: str(c).replace("_", " "))


def _markdown(intro: list[str], threshold: str, tables: list[Table], figures: list[Figure]) -> str:
    lines = ["# DP-CXR study results", ""]
    for paragraph in intro:
        lines += [paragraph, ""]
    lines += [f"Thresholds of the threshold metrics: {_THRESHOLDS.get(threshold, threshold)}.", ""]
    for n, table in enumerate(tables, 1):
        lines += [f"## Table {n}. {table.title}", "", table.caption, "", _display(table.frame).to_markdown(index=False),
                  ""]
    for n, figure in enumerate(figures, 1):
        lines += [f"## Figure {n}. {figure.title}", "", f"![{figure.title}]({figure.file})", "", figure.caption, ""]
    return "\n".join(lines)


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:0 1em;line-height:1.45}"
          "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em;min-width:66%;max-width:100%}"
          "caption{caption-side:top;text-align:left;padding-bottom:0.4em}"
          "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left;overflow-wrap:anywhere}"
          "figure{margin:1em 0 2em}img{max-width:100%;height:auto}figcaption{font-size:0.9em}")


def _html(intro: list[str], threshold: str, tables: list[Table], figures: list[Figure]) -> str:
    body = ["<h1>DP-CXR study results</h1>"] + [f"<p>{escape(p)}</p>" for p in intro]
    body.append(f"<p>Thresholds of the threshold metrics: {escape(_THRESHOLDS.get(threshold, threshold))}.</p>")
    body.append("<h2>Tables</h2>")
    for n, table in enumerate(tables, 1):
        caption = f"<caption><b>Table {n}. {escape(table.title)}.</b> {escape(table.caption)}</caption>"
        html = _display(table.frame).to_html(index=False, border=0, na_rep="")
        body.append(html.replace(">\n  <thead>", f">\n{caption}\n  <thead>", 1))
    body.append("<h2>Figures</h2>")
    body += [f'<figure><img src="{f.file}" alt="{escape(f.title)}"><figcaption><b>Figure {n}. '
             f"{escape(f.title)}.</b> {escape(f.caption)}</figcaption></figure>" for n, f in enumerate(figures, 1)]
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width'><title>DP-CXR study results</title><style>{_STYLE}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.report`` builds the report; ``--update-readme`` copies its table into README.md."""
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--update-readme", action="store_true",
                            help="copy the results table of the last report into README.md instead of reporting")

    run_stage(STAGE, lambda params, args: (update_readme if args.update_readme else report)(params), argv, flags)


if __name__ == "__main__":
    main()

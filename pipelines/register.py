"""The register stage: the grid's models in the MLflow registry, each with its privacy guarantee and model card.

For each epsilon of the grid, the cell with the best mean AUROC on the private val split (the test split is
never used to choose) becomes a new version of ``register.name``: a "models from code" pyfunc (code file +
safetensors + JSON spec, no pickle) tagged with the full privacy record, the lineage and the evaluation
summary, described by a Markdown model card. Aliases come from ``register.aliases``; those listed in
``register.private_aliases`` never name a non-private model. A private model without a complete privacy
record is refused.

Outputs under ``<artifacts>/register/``: ``registered.json`` (name, version, aliases, cell per epsilon) and
``<cell>/model_card.md``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from models.record import PRIVACY_FIELDS, RECORD, RECORD_FIELDS, epsilon_up, privacy_statement, weights_digest
from pipelines.atomic import atomic_folder
from pipelines.budget import composed_epsilon
from pipelines.cells import Cell, trained_cells
from pipelines.config import Params
from pipelines.stage import StageError, run_stage
from pipelines.tracking import cell_run_id, git_commit, stage_run

STAGE = "register"


@dataclass(frozen=True)
class Choice:
    """A model to register and why.

    Attributes:
        cell: the chosen cell.
        aliases: the aliases that will name it.
        selection: ``best-of-grid`` (chosen by val AUROC among ``candidates``) or ``fixed`` (named in the config).
        candidates: every cell the choice looked at (its own cell alone when fixed).
    """

    cell: Cell
    aliases: list[str]
    selection: str
    candidates: list[Cell]


def register_models(params: Params) -> list[dict[str, object]]:
    """Registers the chosen models with their privacy record, bound to their weights, and points the aliases.

    Returns:
        Per registered version: epsilon, cell, registered name, version and aliases.

    Raises:
        StageError: the evaluate stage has not run, a chosen model's privacy record is incomplete, or a private
            alias would name a model without a DP guarantee.
    """
    from models.registry import register

    r = params.register
    evaluated = Path(params.base.artifacts) / "evaluate"
    if not (evaluated / "results.csv").is_file():
        raise StageError(f"no evaluation in {evaluated}: run `dvc repro evaluate` first (the tags carry its results)")
    results, fairness = pd.read_csv(evaluated / "results.csv"), pd.read_csv(evaluated / "fairness.csv")
    thresholds = json.loads((evaluated / "thresholds.json").read_text())
    registered = []
    with atomic_folder(Path(params.base.artifacts) / STAGE) as out, stage_run(STAGE):
        for choice in choose(params, trained_cells(params)):
            cell = choice.cell
            check_record(cell)
            audited = audit_of(params, cell.name)
            record = registered_record(choice, params.train.delta, audited)
            tags = version_tags(cell, params, results, fairness, thresholds, record) | audit_tags(audited)
            refuse_private_aliases(choice, record, r.private_aliases)
            (out / cell.name).mkdir()
            (out / cell.name / RECORD).write_text(json.dumps(record, indent=2))
            card = out / cell.name / "model_card.md"
            card.write_text(model_card(cell, tags, r.name))
            version = register(cell.folder, r.name, tags, choice.aliases, description=card.read_text(),
                               extra_artifacts={"model_card": card, "privacy": out / cell.name / RECORD})
            registered.append({"epsilon": "inf" if math.isinf(cell.train.epsilon) else cell.train.epsilon,
                               "cell": cell.name, "name": r.name, "version": version.version,
                               "aliases": choice.aliases, "privacy_epsilon": record["epsilon"]})
            print(f"register: {r.name} v{version.version} <- {cell.name} (epsilon {record['epsilon']}, "
                  f"{choice.selection}{', aliases ' + ', '.join(choice.aliases) if choice.aliases else ''})",
                  file=sys.stderr)
        (out / "registered.json").write_text(json.dumps(registered, indent=2))
    return registered


def refuse_private_aliases(choice: Choice, record: dict[str, str], private_aliases: list[str]) -> None:
    """Private aliases name only models with a DP guarantee: not the non-private baseline, not a public-seed run.

    Raises:
        StageError: a private alias would name a model without a guarantee.
    """
    refused = set(choice.aliases) & set(private_aliases)
    if refused and (record["epsilon"] == "inf" or record["noise_seed"] != "secret"):
        why = ("non-private" if record["epsilon"] == "inf" else
               "trained with train.reproducible: true (a public noise seed)")
        raise StageError(f"aliases {sorted(refused)} are reserved for private models and cannot name "
                         f"{choice.cell.name}: it is {why}, so it has no DP guarantee")


def choose(params: Params, cells: list[Cell]) -> list[Choice]:
    """The models to register: per epsilon the best by val AUROC (``best-of-grid``), or the named cells (``fixed``)."""
    r = params.register
    if r.select == "fixed":
        by_name = {cell.name: cell for cell in cells}
        named: dict[str, list[str]] = {}
        for alias, name in r.fixed.items():
            named.setdefault(name, []).append(alias)
        return [Choice(by_name[name], aliases, "fixed", [by_name[name]]) for name, aliases in named.items()]
    choices = []
    for eps in params.grid.epsilons:
        candidates = [cell for cell in cells if _same(cell.train.epsilon, eps)]
        best = max(candidates, key=_val_auroc)       # max keeps the first of equals: grid order
        aliases = [alias for alias, target in r.aliases.items() if _same(target, eps)]
        choices.append(Choice(best, aliases, "best-of-grid", candidates))
    return choices


def audit_of(params: Params, cell: str) -> dict[str, object] | None:
    """The audit of a cell's configuration (``<artifacts>/audit/<cell>/audit.json``), if it was audited.

    Raises:
        StageError: the audit found more leakage than the configuration claims: it is never registered.
    """
    path = Path(params.base.artifacts) / "audit" / cell / "audit.json"
    if not path.is_file():
        return None
    audited = json.loads(path.read_text())
    if not audited["passed"]:
        lower = max(max(audited[kind]["epsilon_lower"], audited[kind]["epsilon_lower_fdp"]) for kind in _kinds(audited))
        raise StageError(f"{cell}: its configuration failed the privacy audit (epsilon >= {lower:.3f} measured, "
                         f"{audited['epsilon_claimed']} claimed, {path}): registration refused")
    return audited


def _kinds(audited: dict[str, object]) -> list[str]:
    return [kind for kind in ("whitebox", "blackbox") if kind in audited]


def audit_tags(audited: dict[str, object] | None) -> dict[str, str]:
    """The registry tags of an audit: its lower bounds per canary kind, rounded down (shortened, still a bound)."""
    if audited is None:
        return {}
    tags = {"audit.confidence": str(audited["confidence"])}
    for kind in _kinds(audited):
        tags |= {f"audit.epsilon_lower.{kind}": _down(audited[kind]["epsilon_lower"]),
                 f"audit.epsilon_lower_fdp.{kind}": _down(audited[kind]["epsilon_lower_fdp"]),
                 f"audit.canaries.{kind}": str(audited[kind]["m"])}
    return tags


def _audit_text(audited: dict[str, object] | None, epsilon: str) -> str:
    if audited is None:
        return "not audited (add the cell to audit.cells)"
    found = "; ".join(f"{audited[kind]['kind']}, m = {audited[kind]['m']}: epsilon >= "
                      f"{_down(audited[kind]['epsilon_lower'])} (one-run), >= "
                      f"{_down(audited[kind]['epsilon_lower_fdp'])} (f-DP)" for kind in _kinds(audited))
    return (f"audited at {float(audited['confidence']):.0%} confidence against a proven epsilon <= {epsilon}: "
            f"{found}; one training run of this configuration (a lower bound: evidence the implementation does "
            f"not leak more, not a proof)")


def registered_record(choice: Choice, delta: float, audited: dict[str, object] | None = None) -> dict[str, str]:
    """The privacy record a registered version carries (and the service serves), as text.

    Under ``best-of-grid`` its epsilon is the PLD composition (dp_accounting) of every candidate's history: the
    released model depends on all of them, all trained on the same private data. Epsilon is rounded up; the
    audit's lower bounds (if the configuration was audited) are rounded down.
    """
    record = choice.cell.privacy
    private = _finite(record.get("epsilon"))
    epsilon = record.get("epsilon")
    if private and len(choice.candidates) > 1:
        epsilon = composed_epsilon([tuple(h) for c in choice.candidates for h in c.privacy["history"]], delta)
    values = {**record, "epsilon": epsilon_up(epsilon, 4) if private else "inf",
              "epsilon_cell": epsilon_up(record["epsilon"], 4) if private else "inf",
              "data_set_epsilon": epsilon_up(record.get("data_set_epsilon"), 4)
              if _finite(record.get("data_set_epsilon")) else "inf",
              "selection": choice.selection, "candidates": ", ".join(c.name for c in choice.candidates),
              "weights_sha256": weights_digest(choice.cell.folder)}
    values["audit"] = _audit_text(audited, values["epsilon"])
    return {field: _text(values.get(field)) for field in RECORD_FIELDS}


def _finite(value: object) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _down(epsilon: object) -> str:
    """A lower bound shortened to four decimals, rounded down."""
    return f"{math.floor(float(epsilon) * 1e4) / 1e4:.4f}"


def _same(a: float, b: float) -> bool:
    return (math.isinf(a) and math.isinf(b)) or math.isclose(a, b)


def _val_auroc(cell: Cell) -> float:
    """The selected epoch's val mean AUROC of a cell (its best)."""
    history = json.loads((cell.folder / "history.json").read_text())
    return max((h["val_mean_auroc"] for h in history if h["val_mean_auroc"] == h["val_mean_auroc"]),
               default=float("-inf"))


def check_record(cell: Cell) -> None:
    """Refuses a cell whose privacy record lacks a field, or whose private mechanism is not a real one.

    Raises:
        StageError: the record is incomplete.
    """
    record = cell.privacy
    missing = [f for f in PRIVACY_FIELDS if record.get(f) in (None, "")]
    private = record.get("epsilon") is not None and math.isfinite(float(record["epsilon"]))
    if private and not missing and not (float(record["noise_multiplier"]) > 0 and record["accountant"] != "none"
                                        and int(record["steps"]) > 0):
        missing.append("a noise multiplier, an accountant and steps")
    if missing:
        raise StageError(f"{cell.folder} has an incomplete privacy record (missing {', '.join(missing)}): it cannot "
                         f"be registered; retrain the cell with this version's train stage")


def version_tags(cell: Cell, params: Params, results: pd.DataFrame, fairness: pd.DataFrame,
                 thresholds: dict[str, object], registered: dict[str, str]) -> dict[str, str]:
    """The registry tags of one model: its registered privacy record, lineage, evaluation summary, thresholds."""
    record = cell.privacy
    private_site = params.private_site()
    mean = results[(results["cell"] == cell.name) & (results["site"] == private_site) & (results["metric"] == "auroc")
                   & (results["label"] == "mean")].iloc[0]
    gaps = fairness[(fairness["cell"] == cell.name) & (fairness["site"] == private_site)]
    sex_gap = gaps[gaps["attribute"] == "sex_gap"]["spd_auroc"]
    age_gaps = gaps[gaps["attribute"] == "age_gap"]["spd_auroc"].abs()
    labels = thresholds["labels"]
    tags = {f"privacy.{field}": value for field, value in registered.items()}
    tags |= {"init": record.get("init", {}).get("strategy", cell.train.init),
             "init_source": record.get("init", {}).get("source", ""),
             "init_provenance": record.get("init", {}).get("provenance", ""),
             "pretrain_run_id": record.get("init", {}).get("pretrain_run_id", ""),
             "model_size": cell.train.model, "image_size": str(params.base.image_size), "cell": cell.name,
             "data_version": _text(record.get("data_version")), "git_commit": git_commit(),
             "train_run_id": cell_run_id(cell.name, cell.folder) or "",
             "test_site": private_site, "test_mean_auroc": f"{mean['value']:.4f}",
             "test_mean_auroc_ci95": f"[{mean['ci_low']:.4f}, {mean['ci_high']:.4f}]",
             "thresholds": json.dumps(dict(zip(labels, thresholds["cells"][cell.name], strict=True))),
             "threshold_rule": f"Youden's J on {thresholds['chosen_on']}",
             "fairness.sex_spd_auroc": f"{float(sex_gap.iloc[0]):.4f}" if len(sex_gap) else "nan",
             "fairness.largest_age_spd_auroc": f"{float(age_gaps.max()):.4f}" if len(age_gaps) else "nan"}
    return tags


def _text(value: object) -> str:
    return "" if value is None else str(value)


def model_card(cell: Cell, tags: dict[str, str], name: str) -> str:
    """The model card: the privacy statement, the threat model, lineage and evaluation."""
    record = {key.removeprefix("privacy."): value for key, value in tags.items() if key.startswith("privacy.")}
    private = record["epsilon"] != "inf"
    unit = record["unit"]
    statement = privacy_statement(record)
    guarantee = (
        f"This model was trained with DP-SGD (Opacus, Poisson sampling, per-sample clipping at C = "
        f"{record['max_grad_norm']}, Gaussian noise multiplier {float(record['noise_multiplier']):.4f}, "
        f"sampling rate {float(record['sample_rate']):.4f}, {record['steps']} steps) and satisfies "
        f"(ε = {record['epsilon']}, δ = {record['delta']})-differential privacy with respect to one "
        f"**{unit}** of the private training set (N = {record['n']} {unit}s). Whatever the model or its outputs "
        f"reveal, the probability of any outcome changes by at most a factor e^ε (plus δ) whether or not any one "
        f"{unit} was in the training data."
        if private and record["noise_seed"] == "secret" else
        f"**This model has NO differential privacy guarantee against anyone who knows `train.seed`**: it was "
        f"trained with `train.reproducible: true`, so its sampling and noise can be replayed. Its nominal "
        f"(ε = {record['epsilon']}, δ = {record['delta']}) holds only against adversaries who do not know the seed."
        if private else
        "**This model is NOT differentially private** (ε = ∞): it is the study's non-private baseline, trained on "
        "the same data with the same loop but without clipping or noise. It can memorise training images and must "
        "not leave the data owner's trust boundary.")
    lines = "\n".join(f"- {key.replace('_', ' ').capitalize()}: {value}" for key, value in statement.items())
    return f"""# Model card: {name} ({tags['cell']})

## Privacy guarantee
{guarantee}

{lines}
- Weights: SHA-256 {record['weights_sha256']} (the service refuses to serve weights that do not match)
- Threat model: an adversary who sees the final weights (or every checkpoint), or queries the API without
  limit, and knows everything — the code, the configuration, `train.seed` — except whether one {unit} was in
  the training set and the run's secret noise seed.

## Lineage
- Initialization: {tags['init']} {tags['init_source']} {('(pretraining run ' + tags['pretrain_run_id'] + ')')
                                                       if tags['pretrain_run_id'] else ''} {tags['init_provenance']}
- Model: ConvNeXt-{tags['model_size']}, {tags['image_size']} px grayscale input
- Training data version (data.dvc md5): {tags['data_version']}; prepared store: {tags['privacy.prepare_digest']}
- Training run: {tags['train_run_id'] or 'unknown'}; code: git {tags['git_commit']}

## Evaluation ({tags['test_site']}, test split)
- Mean AUROC {tags['test_mean_auroc']} (95% bootstrap CI {tags['test_mean_auroc_ci95']})
- Decision thresholds ({tags['threshold_rule']}): {tags['thresholds']}
- Fairness: female − male mean AUROC {tags['fairness.sex_spd_auroc']}; largest age-group gap
  {tags['fairness.largest_age_spd_auroc']} (see the report stage for subgroup intervals and flags)

## Intended use
Research on differentially private chest X-ray classification (atelectasis, cardiomegaly, pleural effusion,
pneumonia, no finding). Not a medical device; not for diagnosis.
"""


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.register``."""
    run_stage(STAGE, register_models, argv)


if __name__ == "__main__":
    main()

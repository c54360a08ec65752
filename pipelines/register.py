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
from pathlib import Path

import pandas as pd

from pipelines.atomic import atomic_folder
from pipelines.cells import Cell, trained_cells
from pipelines.config import Params
from pipelines.stage import StageError, run_stage
from pipelines.tracking import cell_run_id, git_commit, stage_run

STAGE = "register"
PRIVACY_FIELDS = ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "max_grad_norm",
                  "unit", "n", "data_version")


def register_models(params: Params) -> list[dict[str, object]]:
    """Registers the best model of each epsilon and points the configured aliases at them.

    Returns:
        Per registered version: epsilon, cell, registered name, version and aliases.

    Raises:
        StageError: the evaluate stage has not run, or a chosen model's privacy record is incomplete.
    """
    from models.registry import register

    r = params.register
    evaluated = Path(params.base.artifacts) / "evaluate"
    if not (evaluated / "results.csv").is_file():
        raise StageError(f"no evaluation in {evaluated}: run `dvc repro evaluate` first (the tags carry its results)")
    results, fairness = pd.read_csv(evaluated / "results.csv"), pd.read_csv(evaluated / "fairness.csv")
    thresholds = json.loads((evaluated / "thresholds.json").read_text())
    chosen = _best_per_epsilon(trained_cells(params))
    registered = []
    with atomic_folder(Path(params.base.artifacts) / STAGE) as out, stage_run(STAGE):
        for eps, cell in chosen.items():
            tags = version_tags(cell, params, results, fairness, thresholds)
            aliases = [alias for alias, target in r.aliases.items() if _same(target, eps)]
            if math.isinf(eps) and set(aliases) & set(r.private_aliases):
                raise StageError(f"aliases {sorted(set(aliases) & set(r.private_aliases))} are reserved for private "
                                 f"models and cannot name the non-private {cell.name}")
            (out / cell.name).mkdir()
            card = out / cell.name / "model_card.md"
            card.write_text(model_card(cell, tags, r.name))
            version = register(cell.folder, r.name, tags, aliases, extra_artifacts={"model_card": card},
                               description=card.read_text())
            registered.append({"epsilon": "inf" if math.isinf(eps) else eps, "cell": cell.name, "name": r.name,
                               "version": version.version, "aliases": aliases})
            print(f"register: {r.name} v{version.version} <- {cell.name} (epsilon {tags['privacy.epsilon']}"
                  f"{', aliases ' + ', '.join(aliases) if aliases else ''})", file=sys.stderr)
        (out / "registered.json").write_text(json.dumps(registered, indent=2))
    return registered


def _same(a: float, b: float) -> bool:
    return (math.isinf(a) and math.isinf(b)) or math.isclose(a, b)


def _best_per_epsilon(cells: list[Cell]) -> dict[float, Cell]:
    """Per target epsilon, the cell with the best selected-epoch val mean AUROC (ties: the first in grid order)."""
    best: dict[float, tuple[float, Cell]] = {}
    for cell in cells:
        history = json.loads((cell.folder / "history.json").read_text())
        score = max((h["val_mean_auroc"] for h in history if h["val_mean_auroc"] == h["val_mean_auroc"]),
                    default=float("-inf"))
        key = cell.train.epsilon
        if key not in best or score > best[key][0]:
            best[key] = (score, cell)
    return {eps: cell for eps, (_, cell) in best.items()}


def version_tags(cell: Cell, params: Params, results: pd.DataFrame, fairness: pd.DataFrame,
                 thresholds: dict[str, object]) -> dict[str, str]:
    """The registry tags of one model: privacy record, lineage, evaluation summary, thresholds.

    Raises:
        StageError: the privacy record lacks a field, or a private model's mechanism is not a real one.
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
    private_site = params.private_site()
    mean = results[(results["cell"] == cell.name) & (results["site"] == private_site) & (results["metric"] == "auroc")
                   & (results["label"] == "mean")].iloc[0]
    gaps = fairness[(fairness["cell"] == cell.name) & (fairness["site"] == private_site)]
    sex_gap = gaps[gaps["attribute"] == "sex_gap"]["spd_auroc"]
    age_gaps = gaps[gaps["attribute"] == "age_gap"]["spd_auroc"].abs()
    labels = thresholds["labels"]
    tags = {f"privacy.{f}": _text(record.get(f)) for f in (*PRIVACY_FIELDS, "epsilon_pld", "epsilon_rdp", "epochs",
                                                          "secure_rng", "opacus_version", "prepare_digest")}
    tags |= {"privacy.epsilon": "inf" if not private else f"{float(record['epsilon']):.4f}",
             "init": record.get("init", {}).get("strategy", cell.train.init),
             "init_source": record.get("init", {}).get("source", ""),
             "pretrain_run_id": record.get("init", {}).get("pretrain_run_id", ""),
             "model_size": cell.train.model, "image_size": str(params.base.image_size), "cell": cell.name,
             "data_version": _text(record.get("data_version")), "git_commit": git_commit(),
             "train_run_id": cell_run_id(cell.name) or "",
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
    """The model card: what the guarantee means here, the threat model, lineage and evaluation."""
    private = tags["privacy.epsilon"] != "inf"
    unit = tags["privacy.unit"]
    guarantee = (
        f"This model was trained with DP-SGD (Opacus, Poisson sampling, per-sample clipping at C = "
        f"{tags['privacy.max_grad_norm']}, Gaussian noise multiplier {float(tags['privacy.noise_multiplier']):.4f}, "
        f"sampling rate {float(tags['privacy.sample_rate']):.4f}, {tags['privacy.steps']} steps) and satisfies "
        f"(ε = {tags['privacy.epsilon']}, δ = {tags['privacy.delta']})-differential privacy with respect to one "
        f"**{unit}** of the private training set (N = {tags['privacy.n']} {unit}s), by the "
        f"{tags['privacy.accountant'].upper()} accountant (cross-checked with dp_accounting: PLD "
        f"{float(tags['privacy.epsilon_pld']):.4f}, RDP {float(tags['privacy.epsilon_rdp']):.4f}). Whatever the "
        f"model or its outputs reveal, the probability of any outcome changes by at most a factor e^ε (plus δ) "
        f"whether or not any one {unit} was in the training data."
        if private else
        "**This model is NOT differentially private** (ε = ∞): it is the study's non-private baseline, trained on "
        "the same data with the same loop but without clipping or noise. It can memorise training images and must "
        "not leave the data owner's trust boundary.")
    return f"""# Model card: {name} ({tags['cell']})

## Privacy guarantee
{guarantee}

- Privacy unit: {unit}. With `unit: image`, a patient with several images is protected per image only
  (group privacy: k images get kε).
- Only the private **training** split is covered; the val split chose the epoch and the thresholds (non-private
  use of a held-out split, as in the study) and the test split only measured the model.
- Threat model: an adversary who sees the final weights, or queries the API without limit, and knows everything
  except whether one {unit} was in the training set. Out of scope: attacks on the floating-point noise
  sampler — Opacus' secure RNG mode (`secure_mode`) is unavailable with the pinned torch, so training used
  torch's standard RNG (secure_rng = {tags['privacy.secure_rng']}); side channels of the training machine; the
  non-private pretraining data (public source, not protected by this guarantee).

## Lineage
- Initialization: {tags['init']} {tags['init_source']} {('(pretraining run ' + tags['pretrain_run_id'] + ')')
                                                       if tags['pretrain_run_id'] else ''}
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

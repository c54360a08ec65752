"""The audit stage: a measured lower bound on epsilon next to the proven upper bound, from one training run.

``audit@<cell>`` trains the cell's exact DP configuration (sigma, q, C, steps, model, init, optimizer, image
size, unit) once more, with m white-box gradient canaries (``models.auditing.GradientCanaries``) each included
with probability 1/2 from the run's secret randomness, and turns the canaries' scores into lower bounds on
epsilon at the configured confidence: the one-run test of Steinke, Nasr & Jagielski (2023) and the tighter
f-DP test of Mahloujifar et al. (2025). The audited model is never saved, so canaries never reach a registered
or served model; the run is a private run on the private data and is charged to the data set's budget.

Outputs under ``<artifacts>/audit/<cell>/``: ``audit.json`` (canary kind, m, guesses made and correct, the
bounds, the claimed epsilon and delta, passed), ``canaries.json`` (each canary's inclusion, times sampled and
score: the secret draw, kept only here) and ``scores.png`` (score histograms, included against excluded).

The audit is a gate: a lower bound above the claimed epsilon means the implementation leaks more than it
claims, and the stage fails with a one-line error (register refuses the configuration).
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

from models.auditing import AuditResult, GradientCanaries, audit_scores  # noqa: E402
from models.privacy import json_value  # noqa: E402
from models.tracking_store import tracking_uri  # noqa: E402
from pipelines.cells import CellFlag  # noqa: E402
from pipelines.config import Params  # noqa: E402
from pipelines.stage import StageError, run_stage  # noqa: E402
from pipelines.training import Canaries, run_training  # noqa: E402

STAGE = "audit"
KIND = "white-box gradient canaries (Dirac: one parameter coordinate each, norm above C before clipping)"


def audit(params: Params) -> dict[str, object]:
    """Audits the configuration of the cell ``params.train`` names.

    Returns:
        The contents of ``audit.json``.

    Raises:
        StageError: a lower bound exceeds the claimed epsilon (the implementation leaks more than it claims),
            or the run itself is refused (budget, delta, init provenance: as for train).
    """
    import mlflow

    a = params.audit
    run = run_training(params, canaries=Canaries(a.canaries, a.magnitude))
    canaries: GradientCanaries = run["canaries"]
    result = audit_scores(canaries.scores.numpy(), canaries.included.numpy(), 1 - a.confidence, run["delta"])
    claimed, out = float(run["epsilon"]), Path(run["out"])
    lower = max(result.epsilon_lower, result.epsilon_lower_fdp)
    passed = math.isinf(claimed) or lower <= claimed
    summary = {"cell": run["cell"], "kind": KIND, "magnitude_over_C": a.magnitude, "confidence": a.confidence,
               "epsilon_claimed": json_value(claimed), "delta": run["delta"],
               "noise_multiplier": run["noise_multiplier"], "sample_rate": run["sample_rate"], "steps": run["steps"],
               "n": run["n"], "noise_seed": run["noise_seed"], "data_set": run["data_set"],
               **result.to_dict(), "passed": passed}
    (out / "audit.json").write_text(json.dumps(summary, indent=2))
    (out / "canaries.json").write_text(json.dumps({
        "included": canaries.included.tolist(), "sampled": canaries.sampled.tolist(),
        "scores": canaries.scores.tolist()}))
    _plot(canaries, result, claimed, out / "scores.png")
    # The audit's own run has ended (it may be a child of the study's run): log to it by id.
    client, run_id = mlflow.MlflowClient(tracking_uri()), str(run["run_id"])
    for key, value in {"audit.epsilon_lower.whitebox": result.epsilon_lower,
                       "audit.epsilon_lower_fdp.whitebox": result.epsilon_lower_fdp, "audit.canaries": result.m,
                       "audit.guesses": result.guesses, "audit.correct": result.correct}.items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "audit.passed", str(passed).lower())
    for name in ("audit.json", "scores.png"):
        client.log_artifact(run_id, str(out / name))
    print(f"audit: {run['cell']}: white-box epsilon >= {result.epsilon_lower:.3f} (one-run), "
          f">= {result.epsilon_lower_fdp:.3f} (f-DP) at {a.confidence:.0%} confidence, against a proven "
          f"epsilon <= {claimed:.3f} -> {out / 'audit.json'}", file=sys.stderr)
    if not passed:
        raise StageError(f"{run['cell']}: the white-box audit measured epsilon >= {lower:.3f} at {a.confidence:.0%} "
                         f"confidence, above the claimed {claimed:.3f}: the implementation leaks more than it "
                         f"claims; do not register this configuration")
    return summary


def _plot(canaries: GradientCanaries, result: AuditResult, claimed: float, path: Path) -> None:
    """Histograms of the canary scores, included against excluded, with the bounds in the title."""
    scores, included = canaries.scores.numpy(), canaries.included.numpy()
    bins = np.linspace(scores.min(), scores.max(), 50) if scores.max() > scores.min() else 10
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.hist(scores[~included], bins=bins, alpha=0.6, label=f"excluded ({(~included).sum()})")
    axes.hist(scores[included], bins=bins, alpha=0.6, label=f"included ({included.sum()})")
    axes.set_xlabel("canary score (sum of the released noisy gradient on its coordinate)")
    axes.set_ylabel("canaries")
    axes.set_title(f"audit: epsilon >= {result.epsilon_lower:.2f} (one-run), >= {result.epsilon_lower_fdp:.2f} "
                   f"(f-DP); proven <= {claimed:.2f}", fontsize=10)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cell", action=CellFlag, metavar="NAME", required=True,
                        help="the grid cell whose configuration to audit (one of audit.cells; what dvc.yaml passes)")


def _work(params: Params, args: argparse.Namespace) -> None:
    if params.train.cell != args.cell:
        raise StageError(f"--cell {args.cell} names the cell {params.train.cell}: write the cell name as the grid "
                         f"spells it")
    audit(params)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.audit --cell domain-8-atto-1.0-0 [-P audit.canaries=2000 ...]``."""
    run_stage(STAGE, _work, argv, flags=_flags)


if __name__ == "__main__":
    main()

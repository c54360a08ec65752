"""The audit stage: a measured lower bound on epsilon next to the proven upper bound, from one training run.

``audit@<cell>`` trains the cell's exact DP configuration (sigma, q, C, steps, model, init, optimizer, image
size, unit) once more, with two kinds of canaries, each its own audit, each canary included with probability 1/2
from the run's secret randomness: white-box gradient canaries (``models.auditing.GradientCanaries``) and
black-box input canaries (``models.auditing.InputCanaries``). It turns each kind's scores into lower bounds on
epsilon at the configured confidence (shared by the kinds): the one-run test of Steinke, Nasr & Jagielski
(2023) and the tighter f-DP test of Mahloujifar et al. (2025). The audited model is never saved, so canaries
never reach a registered or served model; the run is a private run on the private data and is charged to the
data set's budget.

Outputs under ``<artifacts>/audit/<cell>/``: ``audit.json`` (per kind: m, guesses made and correct, the
bounds; the claimed epsilon and delta, passed), ``canaries.json`` (each canary's inclusion, times sampled and
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

from models.auditing import AuditResult, audit_scores  # noqa: E402
from models.privacy import json_value  # noqa: E402
from pipelines.cells import CellFlag  # noqa: E402
from pipelines.config import Params  # noqa: E402
from pipelines.stage import StageError, run_stage  # noqa: E402
from pipelines.training import Canaries, run_training  # noqa: E402

STAGE = "audit"
KINDS = {"whitebox": "white-box gradient canaries (Dirac: one parameter coordinate each, norm above C before "
                     "clipping; scored by the released noisy gradients)",
         "blackbox": "black-box input canaries (public images with every label flipped; scored by the final "
                     "model's loss)"}


def audit(params: Params) -> dict[str, object]:
    """Audits the configuration of the cell ``params.train`` names.

    Returns:
        The contents of ``audit.json``.

    Raises:
        StageError: a lower bound exceeds the claimed epsilon (the implementation leaks more than it claims),
            or the run itself is refused (budget, delta, init provenance: as for train).
    """
    a = params.audit
    run = run_training(params, canaries=Canaries(a.canaries, a.magnitude, a.input_canaries))
    canaries = {"whitebox": run["canaries"], "blackbox": run["input_canaries"]}
    canaries = {kind: c for kind, c in canaries.items() if c is not None}
    # The kinds share the confidence (Bonferroni): all their bounds hold together with probability a.confidence.
    significance = (1 - a.confidence) / len(canaries)
    results = {kind: audit_scores(c.scores.numpy(), c.included.numpy(), significance, run["delta"])
               for kind, c in canaries.items()}
    claimed, out = float(run["epsilon"]), Path(run["out"])
    lower = max(max(r.epsilon_lower, r.epsilon_lower_fdp) for r in results.values())
    passed = math.isinf(claimed) or lower <= claimed
    summary = {"cell": run["cell"], "magnitude_over_C": a.magnitude, "confidence": a.confidence,
               "epsilon_claimed": json_value(claimed), "delta": run["delta"],
               "noise_multiplier": run["noise_multiplier"], "sample_rate": run["sample_rate"], "steps": run["steps"],
               "n": run["n"], "noise_seed": run["noise_seed"], "data_set": run["data_set"],
               **{kind: {"kind": KINDS[kind], **r.to_dict()} for kind, r in results.items()}, "passed": passed}
    (out / "audit.json").write_text(json.dumps(summary, indent=2))
    (out / "canaries.json").write_text(json.dumps({
        kind: {"included": c.included.tolist(), "sampled": c.sampled.tolist(), "scores": c.scores.tolist()}
        for kind, c in canaries.items()}))
    _plot(canaries, results, claimed, out / "scores.png")
    log = run["tracking"]           # the audit's run has ended; its results join its record
    log.log_metrics({f"audit.{key}.{kind}": value for kind, r in results.items()
                     for key, value in {"epsilon_lower": r.epsilon_lower, "epsilon_lower_fdp": r.epsilon_lower_fdp,
                                        "canaries": r.m, "guesses": r.guesses, "correct": r.correct}.items()})
    log.set_tags({"audit.passed": str(passed).lower()})
    for name in ("audit.json", "scores.png"):
        log.log_artifact(out / name)
    log.release()
    for kind, r in results.items():
        print(f"audit: {run['cell']}: {kind} epsilon >= {r.epsilon_lower:.3f} (one-run), >= "
              f"{r.epsilon_lower_fdp:.3f} (f-DP), m = {r.m}", file=sys.stderr)
    print(f"audit: {run['cell']}: at {a.confidence:.0%} confidence (both kinds together), against a proven epsilon "
          f"<= {claimed:.3f} -> {out / 'audit.json'}", file=sys.stderr)
    if not passed:
        raise StageError(f"{run['cell']}: the audit measured epsilon >= {lower:.3f} at {a.confidence:.0%} "
                         f"confidence, above the claimed {claimed:.3f}: the implementation leaks more than it "
                         f"claims; do not register this configuration")
    return summary


def _plot(canaries: dict[str, object], results: dict[str, AuditResult], claimed: float, path: Path) -> None:
    """Histograms of the canary scores per kind, included against excluded, with the bounds in the titles."""
    figure, panels = plt.subplots(1, len(canaries), figsize=(7 * len(canaries), 4), squeeze=False)
    labels = {"whitebox": "score: sum of the released noisy gradient on the canary's coordinate",
              "blackbox": "score: minus the final model's loss on the canary"}
    for axes, (kind, c) in zip(panels[0], canaries.items(), strict=True):
        scores, included = c.scores.numpy(), c.included.numpy()
        bins = np.linspace(scores.min(), scores.max(), 50) if scores.max() > scores.min() else 10
        axes.hist(scores[~included], bins=bins, alpha=0.6, label=f"excluded ({(~included).sum()})")
        axes.hist(scores[included], bins=bins, alpha=0.6, label=f"included ({included.sum()})")
        axes.set_xlabel(labels[kind], fontsize=9)
        axes.set_ylabel("canaries")
        r = results[kind]
        axes.set_title(f"{kind}: epsilon >= {r.epsilon_lower:.2f} (one-run), >= {r.epsilon_lower_fdp:.2f} (f-DP); "
                       f"proven <= {claimed:.2f}", fontsize=10)
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

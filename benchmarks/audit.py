"""The audit's cost against the cell's own training: one run with canaries, not shadow models.

In one process, on the synthetic private site (and the public source, for the input canaries) prepared at
64 px, trains one private cell (``train``) and audits the same configuration (``audit``: the same run plus m
gradient canaries and m' black-box input canaries) in turn (A B A B ...), and prints the median of the
per-round audit/train time ratios. Target (issue 14): at most 1.3x.

    .venv/bin/python benchmarks/audit.py [--rounds 3] [--canaries 1000] [--input-canaries 500] [--model atto]
        [--epochs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workspace import synthetic_workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--input-canaries", type=int, default=500)
    parser.add_argument("--model", default="atto")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="synthetic data scale (1: the demo's size)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dp-cxr-bench-audit-") as scratch:
        root = Path(scratch)
        synthetic_workspace(root, seed=3, scale=args.scale)
        from pipelines.audit import audit
        from pipelines.config import load_params
        from pipelines.prepare import prepare
        from pipelines.train import train

        overrides = ["base.image_size=64", "train.init=scratch", "train.epsilon=8", f"train.model={args.model}",
                     f"train.epochs={args.epochs}", f"audit.canaries={args.canaries}",
                     f"audit.input_canaries={args.input_canaries}",
                     f"grid.models=[{args.model}]", f"audit.cells=[scratch-8-{args.model}-1.0-0]"]
        params = load_params(Path("params.yaml"), overrides)
        prepare(params)
        ratios = []
        for round_ in range(1, args.rounds + 1):
            started = time.perf_counter()
            train(params)
            trained = time.perf_counter() - started
            started = time.perf_counter()
            audit(params)
            audited = time.perf_counter() - started
            ratios.append(audited / trained)
            print(f"round {round_}: train {trained:.1f} s, audit {audited:.1f} s, ratio {ratios[-1]:.3f}",
                  file=sys.stderr)
        print(f"audit of one cell ({args.model}, 64 px, {args.epochs} epochs, {args.canaries} gradient and "
              f"{args.input_canaries} input canaries) / the cell's own training: median "
              f"{statistics.median(ratios):.3f}x over {args.rounds} rounds (target <= 1.3x)")


if __name__ == "__main__":
    main()

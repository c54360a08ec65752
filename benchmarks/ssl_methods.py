"""Which self-supervised method for ``pretrain.ssl.method``: each one's linear probe on the public source.

In one process, generates the synthetic public source (the demo's size at ``--scale 1``), prepares it at 64 px
and runs the pretrain stage's ``ssl`` method with each of simclr, vicreg and byol for the same epochs, then
prints each one's linear-probe mean AUROC on the public test split, its gain over a randomly initialised network
of the same size (paired bootstrap CI and one-sided p) and its wall time relative to the first method's. The
supervised pretraining's probe is printed beside them. Labels are used by the probe only, never by SSL.

    .venv/bin/python benchmarks/ssl_methods.py [--model atto] [--epochs 8] [--scale 1.0] [--public-scale 1.0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from workspace import synthetic_workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="atto")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--scale", type=float, default=1.0, help="synthetic data scale (1: the demo's size)")
    parser.add_argument("--public-scale", type=float, default=1.0, help="multiplies the public source's size")
    parser.add_argument("--methods", default="simclr,vicreg,byol")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dp-cxr-bench-ssl-") as scratch:
        root = Path(scratch)
        synthetic_workspace(root, seed=0, scale=args.scale, public_scale=args.public_scale)
        from pipelines.config import load_params
        from pipelines.prepare import prepare
        from pipelines.pretrain import pretrain

        common = ["base.image_size=64", f"pretrain.models=[{args.model}]"]
        prepare(load_params(Path("params.yaml"), common))
        rows, first = [], None
        runs = [("supervised", ["pretrain.methods=[supervised]", f"pretrain.epochs={args.epochs}"])] + [
            (method, ["pretrain.methods=[ssl]", f"pretrain.ssl.method={method}", f"pretrain.ssl.epochs={args.epochs}"])
            for method in args.methods.split(",")]
        for name, overrides in runs:
            started = time.perf_counter()
            [result] = pretrain(load_params(Path("params.yaml"), [*common, *overrides]))
            elapsed = time.perf_counter() - started
            first = first or elapsed
            rows.append((name, result, elapsed / first))
            print(f"{name}: probe {result['probe_test_mean_auroc']:.4f}, {elapsed:.0f} s", file=sys.stderr)
        print(f"linear probe on the public test split ({args.model}, 64 px, {args.epochs} epochs, scale {args.scale}, "
              f"public scale {args.public_scale}; random init {rows[0][1]['probe_random_init_test_mean_auroc']:.4f}):")
        print(f"{'method':<11} {'probe AUROC':>11} {'gain':>7} {'95% CI':>17} {'p':>7} {'time':>6}")
        for name, r, ratio in rows:
            print(f"{name:<11} {r['probe_test_mean_auroc']:>11.4f} {r['probe_gain']:>+7.4f} "
                  f"[{r['probe_gain_ci_low']:+.3f}, {r['probe_gain_ci_high']:+.3f}] {r['probe_gain_p']:>7.3f} "
                  f"{ratio:>5.2f}x")


if __name__ == "__main__":
    main()

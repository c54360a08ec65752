"""Prepare throughput on a generated synthetic set of at least 20,000 images.

Generates the synthetic sites at ``--scale`` (default 2.6, about 20,600 images) into a temp folder, then runs
the prepare stage (all views, so every image counts) twice in this process: with one worker (the baseline)
and with ``--workers`` (default 2), and prints images/s for each and their ratio.

    .venv/bin/python benchmarks/prepare.py [--scale 2.6] [--workers 2] [--image-size 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=2.6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-cxr-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    try:
        from pipelines.config import load_params
        from pipelines.data.synthetic.generate import generate
        from pipelines.prepare import prepare

        started = time.perf_counter()
        images = generate(work / "data", seed=0, scale=args.scale, workers=args.workers)
        print(f"generated {images} images in {time.perf_counter() - started:.0f} s")
        shutil.copy(REPO / "params.yaml", work / "params.yaml")
        os.chdir(work)
        results = {}
        for workers in (1, args.workers):
            params = load_params(Path("params.yaml"), [f"prepare.workers={workers}", "data.frontal_only=false",
                                                       f"base.image_size={args.image_size}"])
            report = prepare(params)
            results[workers] = report["images_per_second"]
            print(f"prepare, {workers} worker(s): {report['images']} images in {report['seconds']} s "
                  f"= {report['images_per_second']} images/s")
        print(f"ratio {args.workers} workers / 1 worker: {results[args.workers] / results[1]:.2f}x")
        print(yaml.safe_dump({"prepare_images_per_second": results}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

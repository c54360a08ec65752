"""Inference API throughput and latency over real HTTP against a local `bentoml serve`.

Serves the configured alias (``serve.alias`` in params.yaml; run ``make demo`` or ``dvc repro`` first so the
registry has it), sends ``--requests`` single-image ``/predict`` calls at concurrency 1 (the baseline) and at
concurrency 32, and prints images/s, p50/p95 latency and the throughput ratio of 32 to 1.

    .venv/bin/python benchmarks/serve.py [--requests 256] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.config import load_params  # noqa: E402
from pipelines.data.store import open_site  # noqa: E402
from serving.launch import running_server  # noqa: E402
from serving.model_store import import_registered  # noqa: E402
from serving.settings import load_serving_config  # noqa: E402


def run(url: str, images: list[bytes], concurrency: int) -> tuple[float, np.ndarray]:
    """Sends every image once with ``concurrency`` clients; returns images/s and the latencies (s)."""
    import httpx

    def call(payload: bytes) -> float:
        start = time.perf_counter()
        answer = httpx.post(f"{url}/predict", files={"image": ("x.png", payload)}, timeout=120)
        answer.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = np.array(list(pool.map(call, images)))
    return len(images) / (time.perf_counter() - start), latencies


def main() -> None:
    """Runs both loads and prints the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    import_registered(load_serving_config(args.params))
    meta = open_site(Path(params.base.artifacts) / "prepare" / params.private_site()).metadata
    paths = meta[meta["split"] == "test"]["path"].head(args.requests).tolist()
    images = [Path(p).read_bytes() for p in (paths * (args.requests // len(paths) + 1))[:args.requests]]
    with tempfile.TemporaryDirectory() as scratch, running_server(args.params, Path(scratch) / "server.log") as url:
        run(url, images[:16], 4)   # warm-up
        results = {c: run(url, images, c) for c in (1, 32)}
    print(f"inference API, {args.requests} single-image /predict requests (original files, "
          f"{params.base.image_size} px model)")
    for concurrency, (throughput, latencies) in results.items():
        p50, p95 = np.percentile(latencies, [50, 95]) * 1000
        print(f"  concurrency {concurrency:2d}: {throughput:7.1f} images/s, "
              f"latency p50 {p50:6.1f} ms, p95 {p95:6.1f} ms")
    print(f"  throughput ratio concurrency 32 / 1: {results[32][0] / results[1][0]:.2f}x")


if __name__ == "__main__":
    main()

"""MLflow logging throughput from concurrent processes: the embedded SQLite store against the PostgreSQL server.

Each of ``--processes`` processes opens ``--runs`` runs and logs 20 metrics x 100 steps to each (one
``log_metrics`` call per step), as grid cells training side by side do; first against a SQLite file, then against
the team server of ``make tracking-server`` (PostgreSQL, basic auth, started here in a temporary folder). Prints the
metric values per second, the calls that failed (SQLite's "database is locked"), and the server's throughput as a
ratio of SQLite's.

    .venv/bin/python benchmarks/tracking.py [--processes 8] [--runs 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.tracking_server import running  # noqa: E402

WORKER = r"""
import sys, mlflow
runs, failed = int(sys.argv[1]), 0
mlflow.set_experiment("throughput")
for _ in range(runs):
    with mlflow.start_run():
        for step in range(100):
            try:
                mlflow.log_metrics({f"metric_{k}": step * 0.01 + k for k in range(20)}, step=step)
            except Exception:
                failed += 1
print("failed", failed)
"""


def throughput(env: dict[str, str], processes: int, runs: int) -> tuple[float, int]:
    """Metric values logged per second by ``processes`` concurrent processes, and the failed calls."""
    mlflow_env = {**os.environ, **env}
    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.set_experiment('throughput')"], env=mlflow_env,
                   check=True, capture_output=True)     # create the store and experiment before the clock starts
    started = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(runs)], env=mlflow_env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True) for _ in range(processes)]
    failed = sum(int(worker.communicate()[0].split("failed ")[-1].split()[0]) for worker in workers)
    seconds = time.perf_counter() - started
    return processes * runs * 100 * 20 / seconds, failed


def main() -> None:
    """Measures both stores and prints the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    # The server's folder directly under /tmp: PostgreSQL runs as its own user, who must be able to enter it.
    with tempfile.TemporaryDirectory(prefix="dp-cxr-tracking-bench-", dir="/tmp") as scratch:
        sqlite = throughput({"MLFLOW_TRACKING_URI": f"sqlite:///{scratch}/mlflow.db"}, args.processes, args.runs)
    folder = Path(tempfile.mkdtemp(prefix="dp-cxr-tracking-bench-", dir="/tmp"))
    try:
        with running(folder) as server:
            postgres = throughput(server.env(), args.processes, args.runs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"MLflow logging, {args.processes} processes x {args.runs} runs x 20 metrics x 100 steps:")
    for name, (rate, failed) in (("SQLite file", sqlite), ("PostgreSQL server", postgres)):
        print(f"  {name:18s}: {rate:8.0f} metric values/s, {failed} failed calls")
    print(f"  server / SQLite: {postgres[0] / sqlite[0]:.2f}x")


if __name__ == "__main__":
    main()

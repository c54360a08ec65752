"""Validation time of the Great Expectations gate for 200,000 metadata rows.

Builds prepared-style metadata for the private site (``--rows``, default 200,000) and a public site of 20,000
rows from the synthetic cohort model, then times the validate stage in this process twice: on a tenth of the
rows (the baseline) and on all of them, and prints both times and their ratio (10x the rows in at most 10x
the time means the gate scales linearly or better).

    .venv/bin/python benchmarks/validate.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
PRIVATE, PUBLIC = "synthetic-uka-cxr-inhouse", "synthetic-mimic-cxr-jpg"


def metadata(name: str, rows: int, seed: int, private: bool) -> pd.DataFrame:
    from pipelines.data.schema import LABELS
    from pipelines.data.splits import patient_splits
    from pipelines.data.synthetic.cohort import SITES, sample_cohort

    spec = next(s for s in SITES if s.name == name)
    cohort = sample_cohort(spec, rows / spec.patients / 1.6, np.random.default_rng(seed)).head(rows)
    frame = pd.DataFrame({
        "image_id": [f"{name[:6]}-{i:07d}" for i in range(len(cohort))],
        "patient_id": [f"{name[:6]}-p{p:07d}" for p in cohort["patient"]],
        "study_id": [f"{name[:6]}-s{s:07d}" for s in cohort["study"]],
        "site": name, "path": "", "view": cohort["view"], "sex": cohort["sex"], "age": cohort["age"],
        "split": "test", "source_split": None, **{label: cohort[label] for label in LABELS},
        "content_hash": [f"{seed:02d}{i:062x}" for i in range(len(cohort))],
    })
    if private:
        frame["split"] = patient_splits(frame["patient_id"], 0.15, 0.2, seed=0)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-cxr-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    try:
        from pipelines.config import load_params
        from pipelines.validate import validate

        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["data"]["sites"] = {k: v for k, v in raw["data"]["sites"].items() if k in (PRIVATE, PUBLIC)}
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        os.chdir(work)
        private = metadata(PRIVATE, args.rows, 0, private=True)
        public = metadata(PUBLIC, 20_000, 1, private=False)
        Path("artifacts/prepare", PUBLIC).mkdir(parents=True)
        public.to_csv(Path("artifacts/prepare", PUBLIC, "metadata.csv"), index=False)
        params = load_params(Path("params.yaml"))
        Path("artifacts/prepare", PRIVATE).mkdir(parents=True)
        timings = {}
        for rows in (args.rows // 10, args.rows // 10, args.rows):   # the first run warms up imports
            private.head(rows).to_csv(Path("artifacts/prepare", PRIVATE, "metadata.csv"), index=False)
            started = time.perf_counter()
            summary = validate(params)
            timings[rows] = time.perf_counter() - started
            print(f"validate {rows:,} private rows + {len(public):,} public rows: {timings[rows]:.2f} s "
                  f"({summary['evaluated']} expectations, success={summary['success']})")
        small, large = timings[args.rows // 10], timings[args.rows]
        print(f"ratio time({args.rows:,}) / time({args.rows // 10:,}): {large / small:.2f}x for 10x the rows")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

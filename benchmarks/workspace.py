"""A benchmark's temporary project: the synthetic private and public sites and a params.yaml naming only them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def synthetic_workspace(root: Path, seed: int, scale: float, public_scale: float = 1.0) -> None:
    """Makes ``root`` the working directory of a project with its own MLflow store and the two sites generated.

    Args:
        root: an empty temporary folder.
        seed: the synthetic data's seed.
        scale: its size (1: the demo's).
        public_scale: multiplies the public source's size on top of ``scale``.
    """
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.chdir(root)
    from pipelines.data.synthetic.cohort import SITES
    from pipelines.data.synthetic.generate import generate

    sites = tuple(site for site in SITES if site.role in ("private", "public"))
    generate(root / "data", seed=seed, scale=scale, workers=2, sites=sites, public_scale=public_scale)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["sites"] = {site.name: raw["data"]["sites"][site.name] for site in sites}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))

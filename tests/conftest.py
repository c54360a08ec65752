"""Shared fixtures: tool state in temp folders, and a tiny synthetic data set generated once per session."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def tiny(params: dict) -> None:
    """Edits raw params.yaml content to the study at a tiny scale: a few hundred 32 px images, one epoch per
    model, two epsilons, 50 resamples."""
    # A few hundred images cannot meet the default subgroup thresholds: relax those the tiny set misses.
    params["validate"].update(min_test_age_bin_count=0, min_prevalence=0.0, max_prevalence=1.0)
    params["base"]["image_size"] = 32
    params["pretrain"].update(epochs=1, batch=32)
    params["train"].update(epochs=1, logical_batch=32, physical_batch=32, self_check_images=2)
    params["grid"].update(inits=["scratch", "domain"], epsilons=[8, "inf"])
    params["evaluate"].update(resamples=50, min_subgroup_positives=3)
    params["register"].update(aliases={"champion": 8, "non-private-baseline": "inf"}, private_aliases=["champion"])


@pytest.fixture(autouse=True, scope="session")
def _isolated_tool_state(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Points MLflow, DVC, BentoML and Great Expectations at a temp folder, so tests leave nothing behind."""
    state = tmp_path_factory.mktemp("tool-state")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{state / 'mlflow.db'}"
    os.environ["DVC_SITE_CACHE_DIR"] = str(state / "dvc-site-cache")
    os.environ["DVC_NO_ANALYTICS"] = "1"
    os.environ["BENTOML_HOME"] = str(state / "bentoml")
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    os.environ["MPLCONFIGDIR"] = str(state / "matplotlib")
    # MLflow Projects and GX leave tmp* folders behind: keep them in this session's temp folder.
    os.environ["TMPDIR"] = str(state)
    os.environ.pop("MLFLOW_RUN_ID", None)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic multi-site data set at a tiny scale (a few hundred images), generated once."""
    from pipelines.data.synthetic.generate import generate

    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate(root, seed=7, scale=0.06, workers=2)
    return root


@pytest.fixture
def workspace(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with params.yaml and a copy of the tiny data set, as a stage sees the repo root."""
    shutil.copytree(tiny_data, tmp_path / "data")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path

"""MLflow conventions: where runs go, what every run is tagged with, and the data version.

The embedded default is ``sqlite:///mlflow.db`` in the working directory (the repository root), with
artifacts in ``mlruns/``; ``MLFLOW_TRACKING_URI`` points everything at a remote server instead. Inside
``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and a stage attaches to it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

EXPERIMENT = "dp-cxr"
DATA_DVC = Path("data.dvc")


def tracking_uri() -> str:
    """The tracking URI in force: ``MLFLOW_TRACKING_URI`` or the SQLite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def data_version(dvc_file: Path = DATA_DVC) -> str:
    """The DVC md5 of the data folder as committed in ``data.dvc``, or ``untracked``."""
    try:
        return str(yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError):
        return "untracked"


def git_commit() -> str:
    """The checked-out commit, or ``unknown`` outside a git repository."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextmanager
def stage_run(stage: str) -> Iterator[object]:
    """Opens the MLflow run of a stage (attaching to the one ``mlflow run`` made, if any), tagged with lineage.

    Args:
        stage: the stage name, which is also the run name.

    Yields:
        The active ``mlflow.ActiveRun``.
    """
    import mlflow  # slow to import; only stages that log pay for it

    mlflow.set_tracking_uri(tracking_uri())
    if "MLFLOW_RUN_ID" not in os.environ:
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
    with mlflow.start_run(run_name=stage) as run:
        mlflow.set_tags({"dp_cxr.stage": stage, "git_commit": git_commit(), "data_version": data_version()})
        yield run

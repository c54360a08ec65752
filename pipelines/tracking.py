"""MLflow conventions: where runs go, what every run is tagged with, and the data version.

The embedded default is ``sqlite:///mlflow.db`` in the working directory (the repository root), with
artifacts in ``mlruns/``; ``MLFLOW_TRACKING_URI`` points everything at a remote server instead. Inside
``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and a stage attaches to it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from models.tracking_store import tracking_uri

EXPERIMENT = "dp-cxr"
# Beside a trained model: the key (tag ``dp_cxr.run_key``) of the MLflow run that trained it.
RUN_KEY_FILE = "tracking.json"
DATA_DVC = Path("data.dvc")


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


# While training, a call to the store fails at once instead of retrying for minutes (MLflow's default backoff):
# the run's journal (``pipelines.tracking_journal``), not the HTTP client, bridges an outage.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextmanager
def failing_fast() -> Iterator[None]:
    """MLflow HTTP calls inside the block give up after one try of at most 10 s."""
    saved = {key: os.environ.get(key) for key in FAIL_FAST}
    os.environ.update(FAIL_FAST)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# The MLflow run a process's stage runs are children of, when another process opened it (the study's, for a
# grid cell trained under torchrun).
PARENT_RUN_ENV = "DP_CXR_PARENT_RUN_ID"


def child_process_env() -> dict[str, str]:
    """The environment for a process that runs a stage inside this process's active MLflow run (if any)."""
    import mlflow

    env = dict(os.environ)
    active = mlflow.active_run()
    if active is not None:
        env.pop("MLFLOW_RUN_ID", None)          # the child opens its own run, under the active one
        env[PARENT_RUN_ENV] = active.info.run_id
    return env


@contextmanager
def stage_run(stage: str, name: str | None = None) -> Iterator[object]:
    """Opens the MLflow run of a stage, tagged with lineage.

    Inside ``mlflow run`` it attaches to the run MLflow made (``MLFLOW_RUN_ID``); inside another active run (the
    ``main`` entry point's), or in a process that run started (``PARENT_RUN_ENV``: a cell trained under
    torchrun), it is a child run; otherwise a new run in the ``dp-cxr`` experiment.

    Args:
        stage: the stage name (the ``dp_cxr.stage`` tag).
        name: the run name (default: the stage name; grid cells use ``train@<cell>``).

    Yields:
        The active ``mlflow.ActiveRun``.
    """
    import mlflow  # slow to import; only stages that log pay for it

    mlflow.set_tracking_uri(tracking_uri())
    parent = mlflow.active_run()
    parent_id = os.environ.get(PARENT_RUN_ENV) if parent is None else None
    if parent_id:
        extra = {"experiment_id": mlflow.get_run(parent_id).info.experiment_id,
                 "tags": {"mlflow.parentRunId": parent_id}}
    else:
        if parent is None and "MLFLOW_RUN_ID" not in os.environ:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
        extra = {"nested": True, "experiment_id": parent.info.experiment_id} if parent else {}
    with mlflow.start_run(run_name=name or stage, **extra) as run:
        mlflow.set_tags({"dp_cxr.stage": stage, "git_commit": git_commit(), "data_version": data_version()})
        yield run


def flatten(tree: dict[str, object], prefix: str = "") -> dict[str, object]:
    """A nested configuration as MLflow params: ``{"train.epsilon": 8.0, "data.sites.x.format": ...}``."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def cell_run_id(cell: str, folder: Path) -> str | None:
    """The MLflow run that trained grid cell ``cell`` into ``folder``, in any experiment.

    Found by the run key the train stage wrote beside the model (``RUN_KEY_FILE``): exact, whatever other runs
    share the cell's name (reruns, experiments run in parallel). For an output without one, the newest run tagged
    with the cell.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    experiments = [x.experiment_id for x in client.search_experiments()]
    key_file = folder / RUN_KEY_FILE
    query = (f"tags.`dp_cxr.run_key` = '{json.loads(key_file.read_text())['run_key']}'" if key_file.is_file()
             else f"tags.`dp_cxr.cell` = '{cell}'")
    runs = client.search_runs(experiments, query, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None

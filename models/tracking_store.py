"""Where MLflow keeps runs and registered models: one URI for both, resolved in one place."""

from __future__ import annotations

import os
from pathlib import Path

# Where DVC runs a queued (or --temp) experiment: a temporary copy of the repository, removed afterwards.
DVC_EXPERIMENT_WORKSPACE = (".dvc", "tmp", "exps")


def workspace_root() -> Path:
    """The repository this process works for, where its runs, privacy ledger and journals live.

    The working directory (the repository root), except in a DVC experiment's temporary workspace
    (``<repo>/.dvc/tmp/exps/<tmp>/``, made by ``dvc exp run --queue`` and removed when the experiment ends): there,
    the repository that queued it, so that what a queued run spent and recorded outlives its workspace.
    """
    parts = Path.cwd().parts
    for i in range(len(parts) - len(DVC_EXPERIMENT_WORKSPACE)):
        if parts[i:i + len(DVC_EXPERIMENT_WORKSPACE)] == DVC_EXPERIMENT_WORKSPACE:
            return Path(*parts[:i])
    return Path.cwd()


def tracking_uri() -> str:
    """The MLflow store in force, for runs and registry alike.

    ``MLFLOW_TRACKING_URI`` (a tracking server, a database), else the SQLite file ``mlflow.db`` at the
    ``workspace_root`` (the repository root).
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace_root() / 'mlflow.db'}"

"""Where MLflow keeps runs and registered models: one URI for both, resolved in one place."""

from __future__ import annotations

import os
from pathlib import Path


def tracking_uri() -> str:
    """The MLflow store in force, for runs and registry alike.

    ``MLFLOW_TRACKING_URI`` (a tracking server, a database), else the SQLite file ``mlflow.db`` in the working
    directory (the repository root).
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"

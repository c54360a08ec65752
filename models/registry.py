"""The MLflow model registry: registering saved models as "models from code" pyfuncs and resolving aliases.

A registered version's files are ``models/pyfunc.py`` (executed on load), ``model.safetensors`` and ``spec.json``
(plus any extra artifacts, e.g. the pretraining source manifest): nothing is pickled. Tags carry lineage and,
for private models, the privacy record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from models.tracking_store import tracking_uri
from models.weights import SPEC, WEIGHTS

MODEL_CODE = Path(__file__).resolve().parent / "pyfunc.py"
REQUIREMENTS = ("torch", "timm", "safetensors", "numpy", "mlflow")


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model.

    Attributes:
        name: registered model name.
        version: version number.
        run_id: the MLflow run that logged it.
        tags: its version tags.
        model_uri: ``models:/<name>/<version>``.
    """

    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    model_uri: str


def register(folder: Path, name: str, tags: dict[str, object], aliases: list[str] = (),
             extra_artifacts: dict[str, Path] | None = None, description: str = "") -> RegisteredVersion:
    """Logs the saved model in ``folder`` to the active MLflow run and registers it as a new version of ``name``.

    Args:
        folder: a model folder (``model.safetensors`` + ``spec.json``).
        name: the registered model.
        tags: version tags (values are stored as strings).
        aliases: aliases to point at the new version.
        extra_artifacts: more files to store with the model, by artifact name.
        description: the version's description (e.g. the model card).

    Raises:
        FileNotFoundError: the folder lacks the weights or the spec.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    for file in (WEIGHTS, SPEC):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file} is missing: nothing to register")
    spec = json.loads((folder / SPEC).read_text())
    side = spec["image_size"]
    # Preprocessed uint8 images (N, S, S) in, probabilities (N, L) out: MLflow checks inputs against it.
    signature = infer_signature(np.zeros((1, side, side), np.uint8), np.zeros((1, len(spec["labels"])), np.float32))
    artifacts = {"weights": str(folder / WEIGHTS), "spec": str(folder / SPEC)}
    artifacts |= {key: str(path) for key, path in (extra_artifacts or {}).items()}
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(MODEL_CODE), artifacts=artifacts, registered_model_name=name,
        pip_requirements=[f"{package}=={version(package)}" for package in REQUIREMENTS], signature=signature,
        metadata={key: str(value) for key, value in tags.items()})
    number = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, number, key, str(value))
    for alias in aliases:
        client.set_registered_model_alias(name, alias, number)
    if description:
        client.update_model_version(name, number, description=description)
    return get_version(name, number)


def get_version(name: str, version_or_alias: str) -> RegisteredVersion:
    """A registered version by number or alias.

    Raises:
        LookupError: no such registered model, version or alias; the message says how to make one.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri(), tracking_uri())
    try:
        if version_or_alias.isdigit():
            mv = client.get_model_version(name, version_or_alias)
        else:
            mv = client.get_model_version_by_alias(name, version_or_alias)
    except MlflowException as error:
        raise LookupError(f"registered model {name}@{version_or_alias} not found in the MLflow registry at "
                          f"{tracking_uri()}: run the stage that registers it first") from error
    return RegisteredVersion(mv.name, str(mv.version), mv.run_id, dict(mv.tags), f"models:/{mv.name}/{mv.version}")


def download(registered: RegisteredVersion, into: Path) -> Path:
    """Downloads a version's artifacts into ``into`` (the caller's, e.g. a temporary folder).

    Returns:
        The folder holding ``model.safetensors`` and ``spec.json``.
    """
    import mlflow

    # This project's store as the process's default: MLflow's own is ``mlflow.db`` in the working directory, which
    # in a queued DVC experiment's temporary workspace is not the repository's, and resolving a ``models:/`` URI
    # consults the default registry even when download_artifacts is given another.
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered.model_uri, dst_path=str(into)))
    return root / "artifacts"

"""Importing a registered model (by alias) from the MLflow registry into the BentoML model store.

The Bento model holds the same safetensors weights, JSON spec and model card as the registry version (nothing
pickled) and carries the version's tags as metadata: the privacy record, lineage, evaluation and thresholds.
Importing the same registry version twice reuses the existing Bento model.

    python -m serving.model_store [--params params.yaml] [--alias champion]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from serving.settings import ServingConfig, load_serving_config

BENTO_PREFIX = "dp-cxr"
COPIED = ("model.safetensors", "spec.json", "model_card.md")


def bento_model_name(alias: str) -> str:
    """The Bento model serving ``register.name@alias`` (one Bento model per alias, a new tag per version)."""
    return f"{BENTO_PREFIX}-{alias}"


def import_registered(config: ServingConfig, alias: str | None = None) -> object:
    """Imports ``register.name@alias`` into the BentoML store (``BENTOML_HOME``) unless that version is there.

    Args:
        config: the serving configuration (``register.name``, ``serve.alias``).
        alias: the alias to import (default ``serve.alias``).

    Returns:
        The ``bentoml.Model``.

    Raises:
        LookupError: the alias is not in the registry.
    """
    import bentoml
    import bentoml.exceptions

    from models.registry import download, get_version

    alias = alias or config.serve.alias
    registered = get_version(config.registered_model, alias)
    name = bento_model_name(alias)
    try:
        existing_models = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        existing_models = []
    for existing in existing_models:
        if existing.info.labels.get("registered_version") == registered.version and \
                existing.info.labels.get("registered_model") == registered.name:
            return existing
    labels = {"registered_model": registered.name, "registered_version": registered.version, "alias": alias,
              "private": str(registered.tags.get("privacy.epsilon") != "inf").lower()}
    metadata = {"tags": registered.tags, "model_uri": registered.model_uri, "run_id": registered.run_id}
    with tempfile.TemporaryDirectory(prefix="dp-cxr-import-") as scratch, \
            bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        folder = download(registered, Path(scratch))
        for file in COPIED:
            shutil.copy(folder / file, model.path_of(file))
    return bentoml.models.get(f"{name}:{model.tag.version}")


def main(argv: list[str] | None = None) -> None:
    """Command line: import the configured alias (or ``--alias``) and print the Bento model tag."""
    parser = argparse.ArgumentParser(prog="python -m serving.model_store", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--alias", default=None)
    args = parser.parse_args(argv)
    try:
        model = import_registered(load_serving_config(args.params), args.alias)
    except (LookupError, FileNotFoundError, ValueError) as error:
        print(f"model_store: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(model.tag)


if __name__ == "__main__":
    main()

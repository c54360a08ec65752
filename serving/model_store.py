"""Importing a registered model (by alias) from the MLflow registry into the BentoML model store.

The Bento model holds the same safetensors weights, JSON spec, privacy record (``privacy.json``) and model card as
the registry version (nothing pickled) and carries the version's tags as metadata: lineage, evaluation and
thresholds. Its version is the SHA-256 of the weights, which the privacy record names: importing the same
weights again reuses the Bento model, and weights that do not match their record are refused.

    python -m serving.model_store [--params params.yaml] [--alias champion]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from models.record import RECORD, verified_record
from serving.settings import ServingConfig, load_serving_config

BENTO_PREFIX = "dp-cxr"
COPIED = ("model.safetensors", "spec.json", "model_card.md", RECORD)
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
    digest = registered.tags.get("privacy.weights_sha256", "")
    tag = f"{name}:{digest[:32]}"
    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        pass
    labels = {"registered_model": registered.name, "registered_version": registered.version, "alias": alias,
              "private": str(registered.tags.get("privacy.epsilon") != "inf").lower()}
    metadata = {"tags": registered.tags, "model_uri": registered.model_uri, "run_id": registered.run_id}
    with tempfile.TemporaryDirectory(prefix="dp-cxr-import-") as scratch:
        folder = download(registered, Path(scratch))
        verified_record(folder)
        with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
            for file in COPIED:
                shutil.copy(folder / file, model.path_of(file))
    return bentoml.models.get(tag)


def main(argv: list[str] | None = None) -> None:
    """Command line: import the configured alias (or ``--alias``) and print the Bento model tag."""
    parser = argparse.ArgumentParser(prog="python -m serving.model_store", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--alias", default=None)
    args = parser.parse_args(argv)
    try:
        model = import_registered(load_serving_config(args.params), args.alias)
    except (LookupError, FileNotFoundError, ValueError) as error:   # WeightsMismatch is a ValueError
        print(f"model_store: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(model.tag)


if __name__ == "__main__":
    main()

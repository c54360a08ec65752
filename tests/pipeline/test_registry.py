"""The MLflow registry round trip: register a saved model as a models-from-code pyfunc, resolve it by alias, load it."""

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from models.convnext import create_model, predict
from models.registry import download, get_version, register
from models.weights import ModelSpec, load_model, save_model
from pipelines.tracking import stage_run


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(3)
    model = create_model("atto")
    save_model(model, ModelSpec(size="atto", image_size=32, init={"strategy": "scratch"}), tmp_path / "model")
    return model, tmp_path / "model"


def test_register_resolve_by_alias_load_gives_identical_weights(saved, tmp_path):
    model, folder = saved
    with stage_run("pretrain") as run:
        registered = register(folder, "test-roundtrip", {"source_data_version": "abc", "model_size": "atto"},
                              aliases=["current"])
    resolved = get_version("test-roundtrip", "current")
    assert resolved.version == registered.version and resolved.run_id == run.info.run_id
    assert resolved.tags["source_data_version"] == "abc"
    loaded, spec = load_model(download(resolved, tmp_path / "dl"))
    assert spec.size == "atto" and spec.image_size == 32
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    pyfunc = mlflow.pyfunc.load_model("models:/test-roundtrip@current")
    np.testing.assert_array_equal(pyfunc.predict(images), predict(model, images))
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(resolved.model_uri)).rglob("*")}
    assert {"model.safetensors", "spec.json", "pyfunc.py", "MLmodel"} <= files
    assert not any(name.endswith((".pkl", ".pt", ".pth")) for name in files)


def test_a_second_registration_moves_the_alias(saved):
    _, folder = saved
    with stage_run("pretrain"):
        first = register(folder, "test-alias", {}, aliases=["current"])
        second = register(folder, "test-alias", {}, aliases=["current"])
    assert int(second.version) == int(first.version) + 1
    assert get_version("test-alias", "current").version == second.version
    assert get_version("test-alias", first.version).version == first.version


def test_unknown_alias_is_a_clear_error():
    with pytest.raises(LookupError, match="not found in the MLflow registry"):
        get_version("no-such-model", "current")


def test_a_stage_in_a_process_the_active_run_started_is_its_child(monkeypatch):
    """How a grid cell trained under torchrun from the study entry point nests under the study's run."""
    from pipelines.tracking import PARENT_RUN_ENV, child_process_env

    made = mlflow.MlflowClient().create_run(mlflow.set_experiment("nesting").experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", made.info.run_id)            # as `mlflow run` starts the study
    with stage_run("main") as parent:
        env = child_process_env()
    assert env[PARENT_RUN_ENV] == parent.info.run_id and "MLFLOW_RUN_ID" not in env
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv(PARENT_RUN_ENV, parent.info.run_id)         # what the started process sees
    with stage_run("train", name="train@scratch-8-micro-1.0-0") as child:
        pass
    logged = mlflow.get_run(child.info.run_id)
    assert logged.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert logged.info.experiment_id == parent.info.experiment_id

"""The team set-up: MLflow on PostgreSQL behind basic auth (`make tracking-server`), with two grid cells training
in parallel against it and their registry entries written from two processes at once."""

import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import pytest

from pipelines.tracking_server import running

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_project")]
CELLS = ["domain-8-micro-0.5-0", "domain-8-micro-1.0-0"]


def test_two_cells_train_in_parallel_against_the_postgresql_server(tiny_project, tmp_path, monkeypatch):
    project = tiny_project.copy(tmp_path / "project")
    # PostgreSQL runs as its own user, which cannot enter pytest's private temp folders: a folder of its own.
    folder = Path(tempfile.mkdtemp(prefix="dp-cxr-tracking-", dir="/tmp"))
    try:
        _parallel_cells(project, folder, monkeypatch)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _parallel_cells(project, folder, monkeypatch):
    with running(folder) as server:
        env = {**project.env(), **server.env()}
        anonymous = subprocess.run(["python", "-c", "import mlflow; mlflow.search_experiments()"], cwd=project.root,
                                   env={**env, "MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": ""},
                                   capture_output=True, text=True)
        assert anonymous.returncode != 0 and "401" in anonymous.stderr               # basic auth is on

        def run(*args):
            return subprocess.Popen(["python", "-m", *args], cwd=project.root, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)

        def together(*commands):
            for process in [run(*command) for command in commands]:
                output = process.communicate(timeout=600)[0]
                assert process.returncode == 0, output[-3000:]

        # Both pretrained models registered from two processes at once, then both cells trained at once.
        together(*[("pipelines.pretrain", "-P", f"pretrain.methods=[{method}]") for method in ("supervised", "ssl")])
        together(*[("pipelines.train", "--cell", cell) for cell in CELLS])

        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        mlflow.set_tracking_uri(server.uri)
        client = mlflow.MlflowClient()
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`dp_cxr.stage` = 'train'")
        assert sorted(r.data.tags["dp_cxr.cell"] for r in runs) == CELLS                 # one run per cell
        for logged in runs:
            assert logged.info.status == "FINISHED" and logged.data.tags["privacy.data_set"]
            assert len(client.get_metric_history(logged.info.run_id, "epsilon")) == 1   # one epoch, logged as it ran
            assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {"privacy.json", "spec.json",
                                                                                  "history.json"}
        registered = {m.name: m for m in client.search_registered_models()}
        assert set(registered) == {"dp-cxr-pretrain-micro", "dp-cxr-pretrain-ssl-micro"}
        for name, model in registered.items():
            versions = client.search_model_versions(f"name = '{name}'")
            assert len(versions) == 1 and model.aliases == {"current": versions[0].version}
            assert versions[0].run_id in {r.info.run_id for r in client.search_runs(
                [e.experiment_id for e in client.search_experiments()], "tags.`dp_cxr.stage` = 'pretrain'")}
        trained = [r.data.tags["init_source"] for r in runs]
        assert trained == ["models:/dp-cxr-pretrain-micro@current"] * 2                  # the server's registry
    mlflow.set_tracking_uri(None)


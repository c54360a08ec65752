"""The team set-up: MLflow on PostgreSQL behind basic auth (`make tracking-server`), with the whole tiny study run
against it: its grid cells two at a time and registry entries written from two processes at once."""

import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import pytest

from pipelines.tracking_server import running

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_project")]
CELLS = ["domain-8-micro-0.5-0", "domain-8-micro-1.0-0", "domain-inf-micro-0.5-0", "domain-inf-micro-1.0-0"]
STAGES = {"prepare": 1, "validate": 1, "pretrain": 2, "train": 4, "audit": 1, "evaluate": 1, "report": 1, "register": 1}


def test_the_tiny_study_runs_against_the_postgresql_server_two_cells_at_a_time(tiny_project, tmp_path, monkeypatch):
    project = tiny_project.copy(tmp_path / "project")
    # PostgreSQL runs as its own user, which cannot enter pytest's private temp folders: a folder of its own.
    folder = Path(tempfile.mkdtemp(prefix="dp-cxr-tracking-", dir="/tmp"))
    try:
        _study(project, folder, monkeypatch)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _study(project, folder, monkeypatch):
    with running(folder) as server:
        env = {**project.env(), **server.env()}
        anonymous = subprocess.run(["python", "-c", "import mlflow; mlflow.search_experiments()"], cwd=project.root,
                                   env={**env, "MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": ""},
                                   capture_output=True, text=True)
        assert anonymous.returncode != 0 and "401" in anonymous.stderr               # basic auth is on

        def together(*commands):
            processes = [subprocess.Popen(["python", "-m", *command], cwd=project.root, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                         for command in commands]
            for process in processes:
                output = process.communicate(timeout=600)[0]
                assert process.returncode == 0, output[-3000:]

        # Every stage of the study, as dvc.yaml runs them: both pretrained models registered from two processes
        # at once, the four grid cells two at a time.
        together(("pipelines.prepare",))
        together(("pipelines.validate",))
        together(*[("pipelines.pretrain", "-P", f"pretrain.methods=[{method}]") for method in ("supervised", "ssl")])
        for pair in (CELLS[:2], CELLS[2:]):
            together(*[("pipelines.train", "--cell", cell) for cell in pair])
        for stage in ("audit", "evaluate", "report", "register"):
            together((f"pipelines.{stage}", *(["--cell", CELLS[1]] if stage == "audit" else [])))

        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        mlflow.set_tracking_uri(server.uri)
        client = mlflow.MlflowClient()
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        study = [r for r in runs if "dp_cxr.stage" in r.data.tags]
        assert {r.info.status for r in runs} == {"FINISHED"}            # the ledger's runs included
        assert {stage: sum(r.data.tags["dp_cxr.stage"] == stage for r in study) for stage in STAGES} == STAGES
        trained = {r.data.tags["dp_cxr.cell"]: r for r in study if r.data.tags["dp_cxr.stage"] == "train"}
        assert sorted(trained) == sorted(CELLS)                                          # one run per cell
        for logged in trained.values():
            assert logged.data.tags["privacy.data_set"]
            assert len(client.get_metric_history(logged.info.run_id, "epsilon")) == 1   # one epoch, logged as it ran
            assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {"privacy.json", "spec.json",
                                                                                  "history.json"}
            assert logged.data.tags["init_source"] == "models:/dp-cxr-pretrain-micro@current"   # the server's
        [audited] = [r for r in study if r.data.tags["dp_cxr.stage"] == "audit"]
        assert audited.data.tags["audit.passed"] == "true"

        # The registry: one version per pretrained model and per registered cell, every alias naming one version,
        # each version tracing to its run on this server.
        registered = {m.name: m for m in client.search_registered_models()}
        assert set(registered) == {"dp-cxr-pretrain-micro", "dp-cxr-pretrain-ssl-micro", "dp-cxr-classifier"}
        pretrain_runs = {r.info.run_id for r in study if r.data.tags["dp_cxr.stage"] == "pretrain"}
        for name in ("dp-cxr-pretrain-micro", "dp-cxr-pretrain-ssl-micro"):
            [version] = client.search_model_versions(f"name = '{name}'")
            assert registered[name].aliases == {"current": version.version} and version.run_id in pretrain_runs
        versions = client.search_model_versions("name = 'dp-cxr-classifier'")
        by_cell = {v.tags["cell"]: v for v in versions}
        assert len(by_cell) == len(versions) == 2                         # one per epsilon, no duplicate cell
        assert set(registered["dp-cxr-classifier"].aliases) == {"champion", "non-private-baseline"}
        for alias, version in registered["dp-cxr-classifier"].aliases.items():
            [named] = [v for v in versions if v.version == version]
            assert (named.tags["privacy.epsilon"] == "inf") == (alias == "non-private-baseline")
            assert named.tags["train_run_id"] == trained[named.tags["cell"]].info.run_id
    mlflow.set_tracking_uri(None)

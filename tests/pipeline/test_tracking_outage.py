"""Training outlives its tracking server: the run goes on, its record is journalled, and ``python -m
pipelines.tracking_journal sync`` puts it in MLflow complete and once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest

from pipelines.tracking_server import running, start
from tests.conftest import REPO
from tests.pipeline.test_train import FAST

pytestmark = pytest.mark.slow


# One private cell, 3 epochs, with a public seed: two runs give the same numbers.
TRAIN = [sys.executable, "-m", "pipelines.train", *[arg for o in [*FAST, "train.epsilon=8", "train.reproducible=true"]
                                              for arg in ("-P", o)]]


def test_a_run_outlives_the_tracking_server_and_its_record_ends_complete(private_workspace, monkeypatch):
    """The server is killed (SIGKILL) after the run opened, just before the first step, and restarted after the
    run; ``python -m pipelines.tracking_journal sync`` uploads the rest of the record, once: it equals an undisturbed
    run's. (A server back while the run goes on: ``tests/unit/test_tracking_journal.py``.)"""
    # PostgreSQL runs as its own user, which cannot enter pytest's private temp folders: a folder of its own.
    folder = Path(tempfile.mkdtemp(prefix="dp-cxr-tracking-", dir="/tmp"))
    try:
        with running(folder) as server:
            _outlive(private_workspace, folder, server, monkeypatch)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _outlive(root, folder, server, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(REPO), **server.env()}
    port = int(server.uri.rsplit(":", 1)[1])

    def train(experiment, on_line=lambda line, process: None):
        process = subprocess.Popen(TRAIN, cwd=root, env={**env, "MLFLOW_EXPERIMENT_NAME": experiment},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        output = []
        for line in process.stderr:
            output.append(line)
            on_line(line, process)
        assert process.wait(timeout=600) == 0, "".join(output)[-3000:]
        return "".join(output)

    def kill_server():
        os.killpg(int((folder / "server.pid").read_text()), signal.SIGKILL)

    def sync():
        done = subprocess.run([sys.executable, "-m", "pipelines.tracking_journal", "sync"], cwd=root, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr.strip().splitlines()[-1]

    train("undisturbed")

    output = train("restarted-after", lambda line, process: kill_server() if "self-check passed" in line else None)
    assert "did not answer" in output and "python -m pipelines.tracking_journal sync uploads it" in output
    start(folder, port)
    assert sync() == ("tracking: sync: 1 run(s) uploaded, 0 in progress (left to their process), 0 not taken by "
                      "the store; 1 privacy-ledger run(s) brought up to date")
    assert sync() == ("tracking: sync: 0 run(s) uploaded, 0 in progress (left to their process), 0 not taken by "
                      "the store; 0 privacy-ledger run(s) brought up to date")            # idempotent
    assert not any((root / ".mlflow-journal").iterdir())

    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    client = mlflow.MlflowClient(server.uri)

    def record(experiment):
        [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert run.info.status == "FINISHED"
        # The data set's composed epsilon counts the runs before this one: it differs by design.
        metrics = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                   for key in run.data.metrics if key != "data_set_epsilon"}
        tags = {key: value for key, value in run.data.tags.items() if key != "dp_cxr.run_key"}
        return (run.info.run_name, run.data.params, metrics, tags,
                sorted(a.path for a in client.list_artifacts(run.info.run_id)))

    undisturbed = record("undisturbed")
    assert [step for step, _ in undisturbed[2]["val_mean_auroc"]] == [1, 2, 3]          # each epoch once
    assert record("restarted-after") == undisturbed
    # The server's copy of the privacy budget ledger has every step of every run of the local one.
    local = {}
    for line in next((root / ".privacy-ledger").glob("*.jsonl")).read_text().splitlines():
        entry = json.loads(line)
        local.setdefault(entry["run"], [0, "RUNNING"])
        if "event" not in entry:
            local[entry["run"]][0] += 1
        elif entry["event"] == "end":
            local[entry["run"]][1] = entry["status"]
    ledger = client.search_runs([client.get_experiment_by_name("dp-cxr-privacy-ledger").experiment_id])
    assert {r.data.tags["ledger.run"]: [r.data.metrics["steps"], r.info.status] for r in ledger} == local
    assert list(local.values()) == [[undisturbed[2]["steps"][-1][1], "FINISHED"]] * 2
    mlflow.set_tracking_uri(None)

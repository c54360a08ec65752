"""A run's MLflow record survives a tracking store that does not answer: journalled, uploaded once, never twice."""

import json
import time

import mlflow
import pytest

from pipelines.tracking_journal import Journal, TrackedRun, sync, tracked_run
from serving.launch import free_port


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """An unreachable tracking server (nothing listens on its port) and a reachable SQLite store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def _reachable(monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return mlflow.MlflowClient(uri)


def _record(run: TrackedRun, artifact) -> None:
    run.set_tags({"dp_cxr.cell": "scratch-8-atto-1.0-0", "privacy_unit": "image"})
    run.log_params({"train.epsilon": 8.0, "train.epochs": 2})
    for epoch in (1, 2):
        run.log_metrics({"val_mean_auroc": 0.5 + epoch / 10, "epsilon": 4.0 * epoch}, step=epoch)
    run.log_artifact(artifact)


def test_an_offline_run_goes_on_and_sync_uploads_it_once(stores, monkeypatch, capsys):
    artifact = stores / "privacy.json"
    artifact.write_text('{"epsilon": 8.0}')
    started = time.monotonic()
    with tracked_run("train", "train@scratch-8-atto-1.0-0") as run:
        _record(run, artifact)
    run.release()
    assert time.monotonic() - started < 30                 # no retries with backoff: each call fails at once
    err = capsys.readouterr().err
    assert err.count("did not answer") == 1 and "python -m pipelines.tracking_journal sync" in err
    artifact.write_text("changed after logging")           # the journal kept the file as logged
    [folder] = (stores / ".mlflow-journal").iterdir()

    assert sync() == {"uploaded": 0, "in_progress": 0, "unreachable": 1} and folder.is_dir()
    client = _reachable(monkeypatch, stores)
    assert sync() == {"uploaded": 1, "in_progress": 0, "unreachable": 0}
    assert not folder.exists()                             # the store holds it all: the journal is gone
    [logged] = client.search_runs([client.get_experiment_by_name("dp-cxr").experiment_id])
    assert logged.info.run_name == "train@scratch-8-atto-1.0-0" and logged.info.status == "FINISHED"
    assert logged.data.params == {"train.epsilon": "8.0", "train.epochs": "2"}
    assert logged.data.tags["dp_cxr.stage"] == "train" and logged.data.tags["privacy_unit"] == "image"
    history = client.get_metric_history(logged.info.run_id, "epsilon")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 4.0), (2, 8.0)]
    downloaded = client.download_artifacts(logged.info.run_id, "privacy.json", str(stores))
    assert json.loads(open(downloaded).read()) == {"epsilon": 8.0}
    assert sync() == {"uploaded": 0, "in_progress": 0, "unreachable": 0}
    assert len(client.search_runs([logged.info.experiment_id])) == 1


def test_an_upload_whose_answer_was_lost_duplicates_nothing(stores, monkeypatch):
    """The store took part of the record, but the client never heard: the next upload sends only the rest."""
    from pipelines.tracking_journal import upload

    client = _reachable(monkeypatch, stores)
    artifact = stores / "spec.json"
    artifact.write_text("{}")
    run = TrackedRun.open("train", "train@scratch-1-atto-1.0-0")
    _record(run, artifact)
    run.end("FINISHED")
    journal = run.journal
    journal.acknowledge(0)                                  # as if every answer had been lost
    journal.append({"op": "metrics", "metrics": {"epsilon": 9.0}, "step": 3, "timestamp": 1})
    assert upload(journal) == run.run_id
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, "epsilon")) == [
        (1, 4.0), (2, 8.0), (3, 9.0)]
    assert len(client.get_metric_history(run.run_id, "val_mean_auroc")) == 2
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["spec.json"]
    assert len(client.search_runs([client.get_run(run.run_id).info.experiment_id])) == 1


def test_a_run_whose_process_died_is_closed_as_failed_and_a_live_one_is_left_alone(stores, monkeypatch):
    live = TrackedRun.open("train", "train@live")
    died = TrackedRun.open("train", "train@died")
    died.log_metrics({"epsilon": 1.0}, step=1)
    died.release()                                          # as the kernel does when the process dies
    client = _reachable(monkeypatch, stores)
    assert sync() == {"uploaded": 1, "in_progress": 1, "unreachable": 0}
    [logged] = client.search_runs([client.get_experiment_by_name("dp-cxr").experiment_id])
    assert logged.info.run_name == "train@died" and logged.info.status == "FAILED"
    assert logged.data.tags["dp_cxr.abandoned"] == "killed before it ended" and logged.data.metrics["epsilon"] == 1.0
    live.end("FINISHED")                                    # the store answers again: the live run catches up itself
    assert live.run_id is not None and client.get_run(live.run_id).info.status == "FINISHED"
    assert Journal(live.journal.folder).complete()
    live.release()                                          # complete: nothing left to keep
    assert not live.journal.folder.exists()


def test_a_queued_dvc_experiment_records_into_its_repository_not_its_temporary_workspace(tmp_path, monkeypatch):
    """`dvc exp run --queue` runs in <repo>/.dvc/tmp/exps/<tmp>/, removed afterwards: the runs, the privacy ledger
    and the journals of what it trained must stay in the repository."""
    from models.tracking_store import tracking_uri, workspace_root
    from pipelines.budget import ledger_folder
    from pipelines.config import load_params
    from tests.conftest import REPO

    temporary = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpk2x9"
    temporary.mkdir(parents=True)
    monkeypatch.chdir(temporary)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert workspace_root() == tmp_path / "repo"
    assert tracking_uri() == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    assert ledger_folder(load_params(REPO / "params.yaml")) == tmp_path / "repo" / ".privacy-ledger"
    run = TrackedRun.open("train", "train@queued")
    assert run.journal.folder.parent == tmp_path / "repo" / ".mlflow-journal"
    run.end("FINISHED")
    run.release()
    monkeypatch.chdir(tmp_path)
    assert workspace_root() == tmp_path                     # anywhere else: the working directory


@pytest.mark.parametrize("when", ["before the lock file opens", "after it opens, before the lock"])
def test_a_journal_its_process_removes_while_another_syncs_is_skipped(stores, monkeypatch, when):
    """Parallel cells: one ends and removes its complete journal while another, starting, syncs the folder."""
    import fcntl
    import shutil

    client = _reachable(monkeypatch, stores)
    ended = TrackedRun.open("train", "train@ended")
    ended.end("FINISHED")
    folder = ended.journal.folder
    try_lock, flock = Journal.try_lock, fcntl.flock

    def removed_first(journal):
        if journal.folder == folder and when.startswith("before"):
            ended.release()                                 # the owner: complete, so it removes the folder
        return try_lock(journal)

    def removed_between(handle, operation):
        if folder.exists() and when.startswith("after"):
            ended.release()
        return flock(handle, operation)

    monkeypatch.setattr(Journal, "try_lock", removed_first)
    monkeypatch.setattr(fcntl, "flock", removed_between)
    assert sync() == {"uploaded": 0, "in_progress": 0, "unreachable": 0}
    assert not folder.exists() and not (stores / ".mlflow-journal" / folder.name).exists()
    assert client.get_run(ended.run_id).info.status == "FINISHED"
    shutil.rmtree(stores / ".mlflow-journal", ignore_errors=True)

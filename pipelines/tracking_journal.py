"""A training run's MLflow record, written locally first: the tracking store never stops training or loses a record.

Every call a run makes (tags, params, metrics, artifacts, its end) is appended to the run's journal,
``.mlflow-journal/<key>/journal.jsonl`` in the repository root (artifacts copied beside it), and then sent to
the tracking store. When the store does not answer (a server down or restarting, a network cut, a locked
SQLite file), the run goes on offline and tries again every ``RETRY_SECONDS``; what the store missed is uploaded
by the first try that succeeds, at the run's end, by the next run that starts, or on demand:

    python -m pipelines.tracking_journal sync

An upload compares the journal with what the store already holds (the run, found by its ``dp_cxr.run_key`` tag;
each param; each metric's (step, timestamp, value); each artifact's path) and sends only the difference, so it
can be repeated, or follow a request whose answer was lost, without duplicating anything. A journal whose
process died before the run's end (its lock is free) is closed as failed. Journals the store holds completely
are removed.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from models.tracking_store import tracking_uri, workspace_root
from pipelines.tracking import EXPERIMENT, PARENT_RUN_ENV, data_version, failing_fast, git_commit

JOURNALS = ".mlflow-journal"     # in the repository root (``workspace_root``)
RETRY_SECONDS = 15.0


class Journal:
    """The append-only file of one run's calls, and how many of them the store is known to hold."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "journal.jsonl"
        self._acknowledged = folder / "acknowledged"

    def ops(self) -> list[dict[str, object]]:
        """Every call recorded, in order (a line cut short by a crash is dropped)."""
        ops = []
        for line in self.path.read_text().splitlines():
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return ops

    def append(self, op: dict[str, object]) -> None:
        """Adds one call, on disk before anything is sent."""
        with self.path.open("a") as handle:
            handle.write(json.dumps(op) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def keep_file(self, path: Path, index: int) -> str:
        """Copies an artifact into the journal (the original may change before it is uploaded); its relative path."""
        kept = Path("files") / str(index) / path.name
        (self.folder / kept).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, self.folder / kept)
        return str(kept)

    @property
    def acknowledged(self) -> int:
        """How many calls, from the first, the store is known to hold."""
        try:
            return int(self._acknowledged.read_text())
        except (OSError, ValueError):
            return 0

    def acknowledge(self, count: int) -> None:
        """Records that the store holds the first ``count`` calls."""
        partial = self._acknowledged.with_suffix(".partial")
        partial.write_text(str(count))
        partial.replace(self._acknowledged)

    def complete(self) -> bool:
        """The run has ended and the store holds every call."""
        ops = self.ops()
        return any(op["op"] == "end" for op in ops) and self.acknowledged >= len(ops)

    def try_lock(self) -> IO[str] | None:
        """An exclusive lock on the journal (held by the process writing it), or None when another holds it."""
        handle = (self.folder / "lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return handle


class TrackedRun:
    """One run's MLflow record: every call journalled, then sent when the store answers.

    The methods mirror ``mlflow``'s (``set_tags``, ``log_params``, ``log_metrics``, ``log_metric``,
    ``log_artifact``) and never raise for the store's sake. They may be called after ``end`` (an audit adds its
    results to the run it trained) until ``release``; until then ``sync`` leaves the journal to this process.
    """

    def __init__(self, journal: Journal, lock: IO[str]) -> None:
        self.journal = journal
        self.run_id: str | None = None
        self._lock = lock               # held until this process lets go of the run
        self._sent = 0
        self._offline_since: float | None = None

    @classmethod
    def open(cls, stage: str, name: str, root: Path | None = None) -> TrackedRun:
        """Starts a run like ``pipelines.tracking.stage_run`` does, journalled.

        Inside ``mlflow run`` it is the run MLflow made (``MLFLOW_RUN_ID``); inside another active run, or in a
        process that run started (``PARENT_RUN_ENV``), a child run; otherwise a new run in the ``dp-cxr``
        experiment (or ``MLFLOW_EXPERIMENT_NAME``). Journals of earlier runs still waiting for the store are
        uploaded first (so a run killed outright is closed before this one starts).
        """
        import mlflow

        root = root or workspace_root() / JOURNALS
        sync(root, quiet=True)
        active = mlflow.active_run()
        parent = active.info.run_id if active is not None else os.environ.get(PARENT_RUN_ENV)
        key = uuid.uuid4().hex
        journal = Journal(root / key)
        journal.folder.mkdir(parents=True)
        lock = journal.try_lock()
        assert lock is not None         # a folder this process just made
        run = cls(journal, lock)
        run._record({"op": "open", "key": key, "run_name": name, "start_time": _now(), "parent": parent,
                     "attach": None if parent else os.environ.get("MLFLOW_RUN_ID"),
                     "experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT),
                     "tags": {"dp_cxr.stage": stage, "git_commit": git_commit(), "data_version": data_version(),
                              "dp_cxr.run_key": key}})
        return run

    @property
    def key(self) -> str:
        """The run's key: its journal's name and its ``dp_cxr.run_key`` tag."""
        return self.journal.folder.name

    def set_tags(self, tags: dict[str, object]) -> None:
        """Sets tags (values as strings)."""
        self._record({"op": "tags", "tags": {key: str(value) for key, value in tags.items()}})

    def log_params(self, params: dict[str, object]) -> None:
        """Logs params (values as strings, as MLflow stores them)."""
        self._record({"op": "params", "params": {key: str(value) for key, value in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Logs metrics at ``step``, timestamped now (the upload keeps the time)."""
        self._record({"op": "metrics", "metrics": {key: float(value) for key, value in metrics.items()},
                      "step": int(step), "timestamp": _now()})

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        """Logs one metric at ``step``."""
        self.log_metrics({key: value}, step)

    def log_artifact(self, path: Path) -> None:
        """Logs a file as an artifact (copied into the journal first)."""
        index = len(self.journal.ops())
        self._record({"op": "artifact", "file": self.journal.keep_file(Path(path), index), "name": Path(path).name})

    def end(self, status: str) -> None:
        """Records the run's end (``FINISHED``, ``FAILED``, ``KILLED``) and tries the store once more."""
        self._record({"op": "end", "status": status, "end_time": _now()}, retry_now=True)
        if self._offline_since is not None:
            print(f"tracking: warning: the tracking store still does not answer; this run's MLflow record waits in "
                  f"{self.journal.folder}: python -m pipelines.tracking_journal sync uploads it", file=sys.stderr)

    def release(self) -> None:
        """Lets go of the journal once nothing more will be logged, removing it if the store holds it all.

        A process's exit lets go too; ``sync`` then removes or uploads the journal.
        """
        if self.journal.complete():
            shutil.rmtree(self.journal.folder, ignore_errors=True)
        self._lock.close()

    def _record(self, op: dict[str, object], retry_now: bool = False) -> None:
        self.journal.append(op)
        offline = self._offline_since is not None
        if offline and not retry_now and time.monotonic() - self._offline_since < RETRY_SECONDS:
            return
        try:
            with failing_fast():
                if offline or self.run_id is None:
                    self.run_id = upload(self.journal)      # compares with the store: it may hold part of it
                else:
                    self._send_new()
        except Exception as error:  # noqa: BLE001 (whatever the store's failure, training goes on)
            if not offline:
                print(f"tracking: warning: the tracking store did not answer ({type(error).__name__}: "
                      f"{str(error)[:200]}); training goes on, its MLflow record is kept in {self.journal.folder} "
                      f"and uploaded when the store answers again", file=sys.stderr)
            self._offline_since = time.monotonic()
            return
        if offline:
            print("tracking: the tracking store answers again; this run's record there is complete", file=sys.stderr)
        self._offline_since = None
        self._sent = len(self.journal.ops())

    def _send_new(self) -> None:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri())
        ops = self.journal.ops()
        for index in range(self._sent, len(ops)):
            _send(client, str(self.run_id), ops[index], self.journal.folder)
            self.journal.acknowledge(index + 1)


@contextmanager
def tracked_run(stage: str, name: str, root: Path | None = None) -> Iterator[TrackedRun]:
    """A journalled run for the block; ended ``FAILED`` on an error and ``KILLED`` on an interrupt, as MLflow does."""
    run = TrackedRun.open(stage, name, root)
    try:
        yield run
    except BaseException as error:
        run.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    run.end("FINISHED")


def upload(journal: Journal) -> str:
    """Brings the store's copy of a journalled run up to the journal, sending only what it lacks; the run id.

    Raises:
        Exception: whatever the store raises (unreachable, refused): the journal is untouched and can be retried.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    ops = journal.ops()
    run_id = _bind(client, journal, ops)
    ops = journal.ops()         # binding may have added one
    params = client.get_run(run_id).data.params
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id)}
    histories: dict[str, set[tuple[int, int, str]]] = {}
    for op in ops[1:]:
        if op["op"] == "params":
            op = {**op, "params": {k: v for k, v in op["params"].items() if k not in params}}
        elif op["op"] == "metrics":
            for key in op["metrics"]:
                if key not in histories:
                    histories[key] = {(m.step, m.timestamp, _same(m.value))
                                      for m in client.get_metric_history(run_id, key)}
            op = {**op, "metrics": {k: v for k, v in op["metrics"].items()
                                    if (op["step"], op["timestamp"], _same(v)) not in histories[k]}}
        elif op["op"] == "artifact" and op["name"] in artifacts:
            continue
        _send(client, run_id, op, journal.folder)
    journal.acknowledge(len(ops))
    return run_id


def sync(root: Path | None = None, quiet: bool = False) -> dict[str, int]:
    """Uploads every journal the store does not hold completely; removes those it does.

    A journal locked by a live process is left to it. One whose process died before the run's end is closed:
    tagged ``dp_cxr.abandoned`` and ended ``FAILED``.

    Args:
        root: the journals' folder (default: ``.mlflow-journal`` in the repository root).
        quiet: say nothing unless something was uploaded (what a starting run does).

    Returns:
        How many runs were ``uploaded``, ``in_progress`` (left to their process) and ``unreachable`` (the store did
        not answer: run again later).
    """
    root = root or workspace_root() / JOURNALS
    counts = {"uploaded": 0, "in_progress": 0, "unreachable": 0}
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        journal = Journal(folder)
        if not journal.path.is_file():
            continue
        try:
            lock = journal.try_lock()
        except FileNotFoundError:       # its process released it, removing it, since the listing
            continue
        if lock is None:
            counts["in_progress"] += 1
            continue
        with lock:
            if not journal.path.is_file():      # removed by the lock's previous holder: the lock was on a dead file
                continue
            if journal.complete():
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if not any(op["op"] == "end" for op in journal.ops()):
                journal.append({"op": "tags", "tags": {"dp_cxr.abandoned": "killed before it ended"}})
                journal.append({"op": "end", "status": "FAILED", "end_time": _now()})
            try:
                with failing_fast():
                    run_id = upload(journal)
            except Exception as error:  # noqa: BLE001 (report and keep the journal for the next try)
                counts["unreachable"] += 1
                if not quiet:
                    print(f"tracking: {folder.name}: the tracking store did not take it ({type(error).__name__}: "
                          f"{str(error)[:200]}); kept for the next sync", file=sys.stderr)
                continue
            counts["uploaded"] += 1
            print(f"tracking: uploaded the journalled run {folder.name} (MLflow run {run_id})", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    return counts


def _bind(client: object, journal: Journal, ops: list[dict[str, object]]) -> str:
    """The store's run for a journal: the one recorded, the one found by its key, or one made now."""
    opened = ops[0]
    run_id = next((op["run_id"] for op in ops if op["op"] == "bound"), None) or opened["attach"]
    if run_id is None:
        if opened["parent"]:
            experiment = client.get_run(opened["parent"]).info.experiment_id
        else:
            experiment = _experiment_id(client, str(opened["experiment"]))
        found = client.search_runs([experiment], f"tags.`dp_cxr.run_key` = '{opened['key']}'")
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {**opened["tags"], **({"mlflow.parentRunId": opened["parent"]} if opened["parent"] else {})}
            run_id = client.create_run(experiment, start_time=opened["start_time"], tags=tags,
                                       run_name=opened["run_name"]).info.run_id
        journal.append({"op": "bound", "run_id": run_id})
    else:
        client.update_run(run_id, name=opened["run_name"])
    _send(client, run_id, {"op": "tags", "tags": opened["tags"]}, journal.folder)
    return run_id


def _send(client: object, run_id: str, op: dict[str, object], folder: Path) -> None:
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "tags" and op["tags"]:
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in op["tags"].items()])
    elif kind == "params" and op["params"]:
        client.log_batch(run_id, params=[Param(key, value) for key, value in op["params"].items()])
    elif kind == "metrics" and op["metrics"]:
        client.log_batch(run_id, metrics=[Metric(key, value, op["timestamp"], op["step"])
                                          for key, value in op["metrics"].items()])
    elif kind == "artifact":
        client.log_artifact(run_id, str(folder / op["file"]))
    elif kind == "end":
        client.set_terminated(run_id, op["status"], op["end_time"])


def _experiment_id(client: object, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 (another process made it first)
        return client.get_experiment_by_name(name).experiment_id


def _same(value: float) -> str:
    """A metric value as compared with the store's (NaN equal to NaN)."""
    return "nan" if math.isnan(value) else repr(float(value))


def _now() -> int:
    return int(time.time() * 1000)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.tracking_journal sync``: uploads what the tracking store missed while it did not answer.

    The journalled runs and the store's copy of the privacy budget ledgers
    (``pipelines.budget``); both idempotent. Exits 1 when the store still does not take everything.
    """
    import argparse

    from pipelines.budget import ledger_folder, sync_ledgers
    from pipelines.config import ConfigError, load_params

    parser = argparse.ArgumentParser(prog="python -m pipelines.tracking_journal",
                                     description=main.__doc__.splitlines()[0])
    parser.add_argument("action", choices=["sync"])
    parser.add_argument("--journals", type=Path, help=f"the journals' folder (default: {JOURNALS} in the repository)")
    args = parser.parse_args(argv)
    try:
        ledgers = ledger_folder(load_params())
    except ConfigError as error:
        parser.error(str(error))
    counts = sync(args.journals)
    ledger_runs = sync_ledgers(ledgers)
    print(f"tracking: sync: {counts['uploaded']} run(s) uploaded, {counts['in_progress']} in progress (left to their "
          f"process), {counts['unreachable']} not taken by the store; "
          + ("the store did not answer for the privacy ledger" if ledger_runs is None
             else f"{ledger_runs} privacy-ledger run(s) brought up to date"), file=sys.stderr)
    if counts["unreachable"] or ledger_runs is None:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""The privacy budget of each private data set: its append-only ledger, spent epsilon and cap.

The ledger lists every private run on the data set; their composed epsilon is what the data set has spent;
``privacy.budget`` caps it, refusing a run before it touches the data.
A data set is identified by its data version, its prepare digest and the privacy unit. Every private training
process on it — finished, failed, killed, rerun or resumed alike — appends its mechanism and each logical step
it runs to the data set's ledger, in two places: a local append-only file (``privacy.ledger/<data set>.jsonl``,
outside ``artifacts/``, so ``dvc repro``, rerunning a cell or deleting ``artifacts/`` never resets it), and the
MLflow tracking store (experiment ``dp-cxr-privacy-ledger``, one run per training process, its ``steps`` metric
updated every epoch; ``python -m pipelines.tracking_journal sync`` completes it after an outage), so every user of a
shared tracking server sees it. The spent epsilon is the PLD composition (``dp_accounting``) of every step of
every run, at ``train.delta``.

    python -m pipelines.budget        # per data set: runs, steps, epsilon spent, what is left of privacy.budget
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from models.privacy import pld_epsilon
from models.record import epsilon_up
from models.tracking_store import tracking_uri, workspace_root
from pipelines.config import Params
from pipelines.stage import StageError, run_stage
from pipelines.tracking import failing_fast

STAGE = "budget"
EXPERIMENT = "dp-cxr-privacy-ledger"
History = list[tuple[float, float, int]]


class BudgetExceeded(StageError):
    """A run would take a data set's composed epsilon past ``privacy.budget``."""


@dataclass(frozen=True)
class DataSet:
    """A private data set as the ledger knows it.

    Attributes:
        data_version: the DVC md5 of the data (``data.dvc``).
        prepare_digest: the digest of the prepare output the run trains on.
        unit: the privacy unit (``image`` or ``patient``): different units are different neighbouring relations.
    """

    data_version: str
    prepare_digest: str
    unit: str

    @property
    def key(self) -> str:
        """A short stable name for the ledger file and the MLflow tag."""
        digest = hashlib.sha256(f"{self.data_version}|{self.prepare_digest}|{self.unit}".encode()).hexdigest()
        return f"{self.unit}-{digest[:16]}"


def ledger_folder(params: Params) -> Path:
    """``privacy.ledger``; a relative path is taken from the repository root (``workspace_root``).

    So a queued DVC experiment's spending joins its repository's ledger, not its temporary workspace's.
    """
    return workspace_root() / params.privacy.ledger


class LedgerRun:
    """One training process's entry in a data set's ledger; written before its first step and at every step."""

    def __init__(self, folder: Path, data_set: DataSet, cell: str, sigma: float, q: float, planned_steps: int) -> None:
        self.path = folder / f"{data_set.key}.jsonl"
        self.id, self.sigma, self.q, self.steps = uuid.uuid4().hex, sigma, q, 0
        self.data_set, self.cell = data_set, cell
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._append({"event": "start", "run": self.id, "cell": cell, "sigma": sigma, "q": q,
                      "planned_steps": planned_steps, "data_set": data_set.__dict__})
        self._mlflow_run = _mlflow_open(data_set, self, cell)

    def step(self) -> None:
        """Records one more logical step, before it releases anything about the data."""
        self.steps += 1
        self._append({"run": self.id, "sigma": self.sigma, "q": self.q})

    def sync(self) -> None:
        """Brings the tracking store's copy up to the local count (every epoch).

        The count is logged at step = the count, so the store's latest ``steps`` is the largest ever logged.
        """
        if self._mlflow_run is None:        # the store did not answer when the run started
            self._mlflow_run = _mlflow_open(self.data_set, self, self.cell)
        _mlflow_call(lambda client: client.log_metric(self._mlflow_run, "steps", self.steps, step=self.steps))

    def close(self, status: str) -> None:
        """Marks the run ended (``FINISHED``, ``FAILED`` or ``KILLED``) with its final step count."""
        self._append({"event": "end", "run": self.id, "status": status, "steps": self.steps})
        _mlflow_call(lambda client: (client.log_metric(self._mlflow_run, "steps", self.steps, step=self.steps),
                                     client.set_terminated(self._mlflow_run, status)))

    def _append(self, entry: dict[str, object]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def histories(folder: Path, data_set: DataSet) -> dict[str, History]:
    """Every run's (sigma, q, steps) segments on ``data_set``.

    The local mirror, completed from the tracking store (runs made on other machines, or whose local file is gone).
    """
    runs: dict[str, Counter] = defaultdict(Counter)
    path = folder / f"{data_set.key}.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if "event" not in entry and "run" in entry:
                runs[entry["run"]][(float(entry["sigma"]), float(entry["q"]))] += 1
    for run_id, sigma, q, steps in _mlflow_entries(data_set):
        local = sum(runs[run_id].values()) if run_id in runs else 0
        if steps > local:      # the tracking store saw more of this run than this machine's file holds
            runs[run_id] = Counter({(sigma, q): steps})
    return {run_id: [(sigma, q, n) for (sigma, q), n in counts.items()] for run_id, counts in runs.items() if counts}


def sync_ledgers(folder: Path) -> int | None:
    """Brings the tracking store's copy of every local ledger up to the local files (after an outage).

    A run the store never heard of is added; one whose ``steps`` fall short of the local count gets the local
    count; one that ended locally is ended there. Other machines compose their budgets from that copy.

    Returns:
        How many runs were brought up to date, or None when the store did not answer.
    """
    local: dict[str, dict[str, object]] = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if entry.get("event") == "start":
                local[entry["run"]] = {"start": entry, "steps": 0, "status": None}
            elif entry.get("run") not in local:     # a run's lines follow its start; nothing to add without it
                continue
            elif entry.get("event") == "end":
                local[entry["run"]]["status"] = entry["status"]
            else:
                local[entry["run"]]["steps"] += 1

    def update(client: object) -> int:
        found = client.get_experiment_by_name(EXPERIMENT)
        stored = {r.data.tags["ledger.run"]: r for r in (client.search_runs([found.experiment_id], max_results=50000)
                                                          if found else [])}
        updated = 0
        for run_id, entry in local.items():
            start, stored_run = entry["start"], stored.get(run_id)
            if stored_run is None:
                mlflow_run = _create(client, DataSet(**start["data_set"]), run_id, start["cell"], start["sigma"],
                                     start["q"])
                stored_steps, status = 0, "RUNNING"
            else:
                mlflow_run = stored_run.info.run_id
                stored_steps, status = int(stored_run.data.metrics.get("steps", 0)), stored_run.info.status
            if stored_steps >= entry["steps"] and (entry["status"] is None or status == entry["status"]):
                continue
            client.log_metric(mlflow_run, "steps", entry["steps"], step=entry["steps"])
            if entry["status"] is not None:
                client.set_terminated(mlflow_run, entry["status"])
            updated += 1
        return updated

    return _mlflow_call(update) if local else 0


def composed_epsilon(history: History, delta: float) -> float:
    """The PLD (dp_accounting) epsilon of a composition; 0 when nothing ran."""
    return pld_epsilon(history, delta) if history else 0.0


def check_budget(params: Params, data_set: DataSet, planned: History) -> float:
    """Refuses a run whose planned steps would take the data set past ``privacy.budget``; returns the spent epsilon.

    Raises:
        BudgetExceeded: spent + planned composes above the budget (one line naming all three).
    """
    delta, budget = params.train.delta, params.privacy.budget
    spent_history = [segment for run in histories(ledger_folder(params), data_set).values() for segment in run]
    spent = composed_epsilon(spent_history, delta)
    if math.isinf(budget):
        return spent
    total = composed_epsilon(spent_history + planned, delta)
    if total > budget:
        planned_alone = composed_epsilon(planned, delta)
        raise BudgetExceeded(f"privacy budget of data set {data_set.key} exceeded: spent epsilon {spent:.3f}, this run "
                             f"plans {planned_alone:.3f} more, together {total:.3f} > privacy.budget {budget:g} at "
                             f"delta {delta:g}; nothing was trained (raise the budget only if your governance allows)")
    return spent


def budget_report(params: Params) -> list[dict[str, object]]:
    """Per data set in the local ledger folder (and the tracking store): runs, steps, spent epsilon, what is left."""
    folder = ledger_folder(params)
    data_sets = {}
    for path in sorted(folder.glob("*.jsonl")):
        first = json.loads(path.read_text().splitlines()[0])
        data_sets[path.stem] = DataSet(**first["data_set"])
    for data_set in _mlflow_data_sets():
        data_sets.setdefault(data_set.key, data_set)
    rows = []
    for key, data_set in data_sets.items():
        runs = histories(folder, data_set)
        spent = composed_epsilon([s for run in runs.values() for s in run], params.train.delta)
        left = params.privacy.budget - spent
        rows.append({"data_set": key, "unit": data_set.unit, "data_version": data_set.data_version,
                     "runs": len(runs), "steps": sum(n for run in runs.values() for _, _, n in run),
                     "epsilon_spent": spent, "budget": params.privacy.budget, "left": left})
    return rows


def _print(rows: list[dict[str, object]], delta: float) -> None:
    if not rows:
        print("budget: no private training run has been recorded yet")
        return
    print(f"privacy budget per private data set (epsilon at delta {delta:g}, PLD composition of every run)")
    print(f"{'data set':<24} {'unit':<8} {'runs':>5} {'steps':>7} {'spent':>9} {'budget':>8} {'left':>9}")
    for row in rows:
        print(f"{row['data_set']:<24} {row['unit']:<8} {row['runs']:>5} {row['steps']:>7} "
              f"{epsilon_up(row['epsilon_spent'], 3):>9} {row['budget']:>8g} {row['left']:>9.3f}")


def _mlflow_call(call: object) -> object:
    """Calls the tracking store; a failure is reported, never fatal: the local ledger is the one written first."""
    import mlflow

    try:
        with failing_fast():       # never hold training up: the local ledger is the record
            return call(mlflow.MlflowClient(tracking_uri()))
    except Exception as error:  # noqa: BLE001 (any tracking failure: the run must not lose its local record)
        print(f"budget: warning: the tracking store did not take the ledger entry ({type(error).__name__}); "
              f"the local ledger has it", file=sys.stderr)
        return None


def _experiment(client: object) -> str:
    found = client.get_experiment_by_name(EXPERIMENT)
    return found.experiment_id if found else client.create_experiment(EXPERIMENT)


def _create(client: object, data_set: DataSet, run_id: str, cell: str, sigma: float, q: float) -> str:
    created = client.create_run(_experiment(client), run_name=f"{cell}:{run_id[:8]}", tags={
        "ledger.data_set": data_set.key, "ledger.run": run_id, "ledger.cell": cell,
        "ledger.data_version": data_set.data_version, "ledger.prepare_digest": data_set.prepare_digest,
        "ledger.unit": data_set.unit, "ledger.sigma": repr(sigma), "ledger.q": repr(q)})
    client.log_metric(created.info.run_id, "steps", 0)
    return created.info.run_id


def _mlflow_open(data_set: DataSet, run: LedgerRun, cell: str) -> str | None:
    return _mlflow_call(lambda client: _create(client, data_set, run.id, cell, run.sigma, run.q))


def _mlflow_entries(data_set: DataSet) -> list[tuple[str, float, float, int]]:
    def search(client: object) -> list[tuple[str, float, float, int]]:
        found = client.get_experiment_by_name(EXPERIMENT)
        if found is None:
            return []
        runs = client.search_runs([found.experiment_id], f"tags.`ledger.data_set` = '{data_set.key}'",
                                  max_results=50000)
        return [(r.data.tags["ledger.run"], float(r.data.tags["ledger.sigma"]), float(r.data.tags["ledger.q"]),
                 int(r.data.metrics.get("steps", 0))) for r in runs]

    return _mlflow_call(search) or []


def _mlflow_data_sets() -> list[DataSet]:
    def search(client: object) -> list[DataSet]:
        found = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([found.experiment_id], max_results=50000) if found else []
        return [DataSet(r.data.tags["ledger.data_version"], r.data.tags["ledger.prepare_digest"],
                        r.data.tags["ledger.unit"]) for r in runs]

    return _mlflow_call(search) or []


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.budget``: the spent budget of every private data set."""
    run_stage(STAGE, lambda params: _print(budget_report(params), params.train.delta), argv)


if __name__ == "__main__":
    main()

"""The train stage: one grid cell trained with DP-SGD on the private site (``pipelines.training`` runs it).

A cell is (init, epsilon, model, data fraction, seed), named ``<init>-<epsilon>-<model>-<fraction>-<seed>``
everywhere: the DVC stage ``train@<cell>``, the folder ``<artifacts>/train/<cell>/``, the MLflow run. Outputs:
``model.safetensors`` + ``spec.json`` (the selected weights), ``privacy.json`` (the privacy record),
``history.json``, ``checkpoint/`` and ``ledger.jsonl``. ``--resume`` continues a killed run; its accountant
counts every step the ledger recorded, including those after the last checkpoint. With ``train.processes`` > 1
the stage starts itself again under ``torchrun`` (``pipelines.processes``); started by torchrun (by that, or by a
user's multi-machine launch), it trains its rank's shard.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pipelines.cells import GRID_KNOBS, CellFlag
from pipelines.config import Params, dump_params
from pipelines.processes import launched_by_torchrun, process_group, relaunch_with_torchrun
from pipelines.stage import SetKey, StageError, compute_device, run_stage
from pipelines.tracking import child_process_env
from pipelines.training import run_training

STAGE = "train"


def train(params: Params, resume: bool = False) -> dict[str, object]:
    """Trains the cell ``params.train`` names (see ``pipelines.training.run_training``).

    With ``train.processes`` > 1 it starts that many processes under torchrun, which train the cell together (one
    MLflow run, one privacy record: rank 0's); in a process torchrun started, it trains that rank's shard.
    """
    if params.train.processes > 1 and not launched_by_torchrun():
        return _in_processes(params, resume)
    with process_group(compute_device(params)) as processes:
        return run_training(params, resume=resume, processes=processes)


def _in_processes(params: Params, resume: bool) -> dict[str, object]:
    """Trains the cell in ``train.processes`` processes under torchrun, with exactly this configuration."""
    t = params.train
    with tempfile.TemporaryDirectory(prefix="dp-cxr-train-") as scratch:
        resolved = Path(scratch) / "params.yaml"    # the resolved configuration, overrides included
        resolved.write_text(dump_params(params))
        argv = ["--params", str(resolved), "--cell", t.cell, *(["--resume"] if resume else [])]
        status = relaunch_with_torchrun("pipelines.train", t.processes, argv, child_process_env())
    if status:
        raise StageError(f"the {t.processes} training processes of {t.cell} failed (exit status {status}); their "
                         f"errors are above")
    return {"cell": t.cell, "processes": t.processes,
            **json.loads((Path(params.base.artifacts) / STAGE / t.cell / "privacy.json").read_text())}


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue the cell from its last checkpoint; every step in its ledger is charged")
    parser.add_argument("--cell", action=CellFlag, metavar="NAME",
                        help="the grid cell to train, by its name <init>-<epsilon>-<model>-<fraction>-<seed> "
                             "(e.g. scratch-8-atto-1.0-0; what dvc.yaml passes)")
    for knob in GRID_KNOBS:
        parser.add_argument("--" + knob.replace("_", "-"), action=SetKey, key=f"train.{knob}", metavar="VALUE",
                            help=f"train.{knob} of the cell (an empty value keeps params.yaml's)")


def _work(params: Params, args: argparse.Namespace) -> None:
    if args.cell and params.train.cell != args.cell:
        raise StageError(f"--cell {args.cell} names the cell {params.train.cell}: write the cell name as the grid "
                         f"spells it (or drop the -P override of its knobs)")
    train(params, resume=args.resume)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.train [--resume] [--cell NAME | --epsilon 3 --init domain ...] [-P train.lr=1e-3 ...]``."""
    run_stage(STAGE, _work, argv, flags=_flags)


if __name__ == "__main__":
    main()

"""The train stage: one grid cell trained with DP-SGD on the private site (``pipelines.training`` runs it).

A cell is (init, epsilon, model, data fraction, seed), named ``<init>-<epsilon>-<model>-<fraction>-<seed>``
everywhere: the DVC stage ``train@<cell>``, the folder ``<artifacts>/train/<cell>/``, the MLflow run. Outputs:
``model.safetensors`` + ``spec.json`` (the selected weights), ``privacy.json`` (the privacy record),
``history.json``, ``checkpoint/`` and ``ledger.jsonl``. ``--resume`` continues a killed run; its accountant
counts every step the ledger recorded, including those after the last checkpoint.
"""

from __future__ import annotations

import argparse

from pipelines.cells import GRID_KNOBS, CellFlag
from pipelines.config import Params
from pipelines.stage import SetKey, StageError, run_stage
from pipelines.training import run_training

STAGE = "train"


def train(params: Params, resume: bool = False) -> dict[str, object]:
    """Trains the cell ``params.train`` names (see ``pipelines.training.run_training``)."""
    return run_training(params, resume=resume)


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

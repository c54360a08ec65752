"""The identity of a grid cell: one name for its DVC stage, output folder, MLflow run and registry tag.

A cell is (init, epsilon, model, data fraction, seed), named ``<init>-<epsilon>-<model>-<fraction>-<seed>``,
e.g. ``scratch-8-atto-1.0-0``. DVC names the matrix stage ``train@`` + its values joined by ``-`` (each value
as Python's ``str`` of the YAML value), so the name is spelled the same way: epsilons as integers where they
are whole (``8``, ``inf``), fractions as floats (``1.0``). ``pipelines.config`` refuses grid values written
otherwise, which makes the DVC stage key and this name equal by construction.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # pipelines.config imports this module for the names
    from pipelines.config import Params, Train

GRID_KNOBS = ("init", "epsilon", "model", "data_fraction", "seed")   # the train fields a grid cell varies
TRAIN = "train"
# The train inits that start from the pretrain stage, and the pretraining method each starts from.
PRETRAINED_INITS = {"domain": "supervised", "ssl": "ssl"}


def epsilon_text(epsilon: float) -> str:
    """An epsilon as it names a cell: ``8``, ``0.5``, ``inf``."""
    if math.isinf(epsilon):
        return "inf"
    return str(int(epsilon)) if float(epsilon).is_integer() else repr(float(epsilon))


def fraction_text(fraction: float) -> str:
    """A data fraction as it names a cell: ``1.0``, ``0.25``."""
    return repr(float(fraction))


def cell_name(init: str, epsilon: float, model: str, data_fraction: float, seed: int) -> str:
    """The cell's name, e.g. ``scratch-8-atto-1.0-0``."""
    return f"{init}-{epsilon_text(epsilon)}-{model}-{fraction_text(data_fraction)}-{seed}"


def parse_cell(name: str) -> dict[str, str]:
    """The grid knobs of a cell name, as override strings (``{"init": "scratch", "epsilon": "8", ...}``).

    The init may itself contain ``-`` (a checkpoint path); the other four parts never do.

    Raises:
        ValueError: the name does not have five parts.
    """
    parts = name.rsplit("-", 4)
    if len(parts) != 5 or not all(parts):
        raise ValueError(f"cell {name!r} is not <init>-<epsilon>-<model>-<fraction>-<seed> (e.g. scratch-8-atto-1.0-0)")
    return dict(zip(GRID_KNOBS, parts, strict=True))


def pretrained_name(method: str, size: str) -> str:
    """A pretrained model's folder under ``artifacts/pretrain`` and registry suffix: ``atto`` or ``ssl-atto``."""
    return size if method == "supervised" else f"{method}-{size}"


def run_name(cell: str) -> str:
    """The MLflow run name of a trained cell (the same as its DVC stage key)."""
    return f"{TRAIN}@{cell}"


@dataclass(frozen=True)
class Cell:
    """A trained grid cell.

    Attributes:
        name: its name (and folder name).
        folder: ``<artifacts>/train/<name>``.
        train: its configuration.
        privacy: its privacy record.
    """

    name: str
    folder: Path
    train: Train
    privacy: dict[str, object]

    def describe(self) -> dict[str, object]:
        """The cell's grid knobs and spent epsilon, for table rows."""
        return {"cell": self.name, **{k: getattr(self.train, k) for k in GRID_KNOBS},
                "epsilon_spent": self.privacy["epsilon"]}


def trained_cells(params: Params) -> list[Cell]:
    """The trained model of every cell of the grid, each found once, by its name.

    Raises:
        FileNotFoundError: a grid cell has not been trained.
    """
    root = Path(params.base.artifacts) / TRAIN
    cells = []
    for t in params.grid_cells():
        folder = root / t.cell
        if not (folder / "privacy.json").is_file():
            raise FileNotFoundError(f"grid cell {t.cell} has no trained model in {folder}: run `dvc repro` (or "
                                    f"`python -m pipelines.train --cell {t.cell}`) first")
        cells.append(Cell(t.cell, folder, t, json.loads((folder / "privacy.json").read_text())))
    return cells


class CellFlag(argparse.Action):
    """``--cell NAME``: sets the five grid knobs from a cell name (``train.<knob>=<value>`` overrides)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: object,
                 option_string: str | None = None) -> None:
        """Records the name and adds ``train.<knob>=<value>`` overrides for its five knobs (empty: no cell)."""
        if value == "":
            return
        try:
            knobs = parse_cell(str(value))
        except ValueError as error:
            parser.error(str(error))
        namespace.cell = value
        namespace.set_keys = [*namespace.set_keys, *(f"train.{k}={v}" for k, v in knobs.items())]

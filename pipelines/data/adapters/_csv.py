"""Reading the released CSV files the same way in every adapter: by column name, every cell as a string."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


class MissingColumns(ValueError):
    """A CSV lacks columns its format requires (``missing`` names them)."""

    def __init__(self, path: Path, missing: list[str]) -> None:
        super().__init__(f"{path.name} lacks columns {missing}: is this the right file for this data set?")
        self.path, self.missing = path, missing


def find_file(root: Path, *names: str) -> Path:
    """The first of ``names`` (tried also with ``.gz``) that exists under ``root``.

    Raises:
        FileNotFoundError: none exists; the message names what was looked for and where.
    """
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"none of {', '.join(names)} (or .gz) found in {root}: "
        f"point the site's path in params.yaml at the data set's root"
    )


def read_csv(path: Path, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Reads a CSV with every cell as a string (ids must never become numbers) and checks required columns.

    Raises:
        MissingColumns: a required column is missing.
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], compression="infer")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise MissingColumns(path, missing)
    return frame

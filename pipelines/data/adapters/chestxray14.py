"""NIH ChestX-ray14: the Data_Entry CSV and PNGs spread over ``images_001 .. images_012`` folders.

The entry file is ``Data_Entry_2017_v2020.csv`` or the original ``Data_Entry_2017.csv``.

``Finding Labels`` is ``|``-joined tokens or exactly ``No Finding``; a label absent from the list was assessed
and is negative. Only the token ``Pneumonia`` is pneumonia (not Infiltration or Consolidation). The original
file ends every line with a comma, and has ages above 110; the v2020 file has ages of 0: both become null.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pipelines.data.adapters._csv import find_file, read_csv
from pipelines.data.schema import LABELS, finalize_manifest, is_missing, parse_number, parse_sex, valid_age

TOKENS = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "pleural_effusion": "Effusion",
          "pneumonia": "Pneumonia", "no_finding": "No Finding"}
SPLIT_LISTS = {"train_val_list.txt": "train", "test_list.txt": "test"}


def read(root: Path, site: str) -> pd.DataFrame:
    """Reads a ChestX-ray14 copy into the common manifest.

    Args:
        root: folder with the Data_Entry CSV, the optional split lists and the image folders.
        site: the configured site name.
    """
    raw = read_csv(find_file(root, "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"),
                   ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"))
    located = _index_images(root)
    split_of: dict[str, str] = {}
    for name, split in SPLIT_LISTS.items():
        if (root / name).is_file():
            split_of.update({line.strip(): split for line in (root / name).read_text().splitlines() if line.strip()})
    findings = raw["Finding Labels"].map(_tokens)
    out = pd.DataFrame({
        "image_id": raw["Image Index"],
        "patient_id": raw["Patient ID"].map(lambda p: str(int(p))),
        "study_id": raw["Image Index"].str.replace(".png", "", regex=False),
        "site": site,
        "path": raw["Image Index"].map(lambda n: str(located.get(n, root / "images" / n))),
        "view": raw["View Position"].map(lambda v: v.strip() if v.strip() in ("PA", "AP") else "OTHER"),
        "sex": raw["Patient Gender"].map(parse_sex),
        "age": raw["Patient Age"].map(lambda a: valid_age(parse_number(a))),
        "split": raw["Image Index"].map(split_of.get),
    })
    for label in LABELS:
        out[label] = findings.map(lambda tokens, t=TOKENS[label]: float(t in tokens))
    return finalize_manifest(out)


def _tokens(cell: str) -> frozenset[str]:
    if is_missing(cell):
        raise ValueError("ChestX-ray14 column 'Finding Labels' has an empty cell; the release always lists findings "
                         "or 'No Finding': is this Data_Entry_2017(_v2020).csv?")
    return frozenset(token.strip() for token in cell.split("|"))


def _index_images(root: Path) -> dict[str, Path]:
    """Finds every PNG under root once, by file name (the release spreads them over several folders)."""
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".png"):
                found.setdefault(name, Path(folder) / name)
    return found

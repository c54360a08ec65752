"""CheXpert v1.0 and v1.0-small, as downloaded: ``train.csv``/``valid.csv`` (+ the labelled ``test_labels.csv``).

Two layouts are read. The small release unzips to ``CheXpert-v1.0-small/{train.csv, valid.csv, train/, valid/}``.
The full (high-resolution) release unzips to ``CheXpert-v1.0 batch 1 (validate & csv)/{train.csv, valid.csv,
valid/}`` and ``CheXpert-v1.0 batch 2 (train 1)/patientNNNNN/...`` ... batch 4, with no ``train/`` folder. The
site's path is the release folder or the folder holding the batch folders; the CSVs are looked for there and one
level down, and every image is found by its ``patientNNNNN/studyN/viewN_*.jpg`` tail under whichever folder holds
that patient. ``Path`` starts with the release folder (``CheXpert-v1.0-small/train/...``), which the image id
drops; ``test_labels.csv`` paths start with ``test/``, which it keeps.

Sex is ``Male``/``Female``/``Unknown``; ``Age`` 0 means missing. Labels are 1.0/0.0/-1.0/blank; ``No Finding``
is only 1.0 or blank. A frontal image is one with ``Frontal`` and ``AP/PA`` in {AP, PA}; the few frontal rows
marked ``LL``/``RL`` are suspicious and become ``OTHER``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from pipelines.data.adapters._csv import read_csv
from pipelines.data.schema import finalize_manifest, parse_labels, parse_number, parse_sex, valid_age

LABEL_COLUMNS = {
    "atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia", "no_finding": "No Finding",
}
FILES = {"train.csv": "train", "valid.csv": "val", "test_labels.csv": "test"}
_PATIENT = re.compile(r"(patient\d+)/(study\d+)/")
_SPLIT_FOLDERS = ("train", "valid", "test")


def read(root: Path, site: str) -> pd.DataFrame:
    """Reads a CheXpert copy into the common manifest.

    Args:
        root: the release folder (``CheXpert-v1.0-small``), or the folder holding the full release's batch folders.
        site: the configured site name.

    Raises:
        FileNotFoundError: neither train.csv nor valid.csv is there or one folder down.
        ValueError: a CSV lacks a column, or a Path has no patientNNNNN/studyN part.
    """
    parts = []
    for name, split in FILES.items():
        if path := _find_csv(root, name):
            raw = read_csv(path, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABEL_COLUMNS.values()))
            parts.append(raw.assign(_split=split, _file=str(path)))
    if not parts:
        raise FileNotFoundError(f"no train.csv or valid.csv in {root} or one folder down: point the site's path at "
                                f"the CheXpert-v1.0(-small) folder, or at the folder holding the batch folders")
    frame = pd.concat(parts, ignore_index=True)
    relative = frame["Path"].map(_without_release_folder)
    ids = relative.map(_PATIENT.search)
    if ids.isna().any():
        bad = relative[ids.isna()].iloc[0]
        raise ValueError(f"CheXpert Path {bad!r} has no patientNNNNN/studyN part: is this a CheXpert CSV?")
    folders = _patient_folders(root)
    out = pd.DataFrame({
        "image_id": relative,
        "patient_id": ids.map(lambda m: m.group(1)),
        "study_id": ids.map(lambda m: f"{m.group(1)}/{m.group(2)}"),
        "site": site,
        "path": [str(folders[m.group(1)] / p[m.start():] if m.group(1) in folders else root / p)
                 for p, m in zip(relative, ids, strict=True)],
        "view": [_view(f, a) for f, a in zip(frame["Frontal/Lateral"], frame["AP/PA"], strict=True)],
        "sex": frame["Sex"].map(parse_sex),
        "age": frame["Age"].map(lambda a: valid_age(parse_number(a))),
        "split": frame["_split"],
    })
    for label, column in LABEL_COLUMNS.items():
        out[label] = parse_labels(frame[column], column, frame["_file"])
    return finalize_manifest(out)


def _find_csv(root: Path, name: str) -> Path | None:
    """``name`` in ``root``, else in the first of its subfolders (sorted) that has it."""
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (folder / name).is_file():
            return folder / name
    return None


def _without_release_folder(path: str) -> str:
    """``CheXpert-v1.0-small/train/patient1/...`` -> ``train/patient1/...``; ``test/patient1/...`` unchanged."""
    first, _, rest = path.partition("/")
    return rest if first.startswith("CheXpert") and rest else path


def _patient_folders(root: Path) -> dict[str, Path]:
    """Where each ``patientNNNNN`` folder lies: root or a batch folder, directly or under train/, valid/, test/."""
    found: dict[str, Path] = {}
    for top in [root, *sorted(p for p in root.iterdir() if p.is_dir() and p.name not in _SPLIT_FOLDERS)]:
        for folder in [top, *(top / name for name in _SPLIT_FOLDERS)]:
            if folder.is_dir():
                for entry in os.scandir(folder):
                    if entry.name.startswith("patient") and entry.is_dir():
                        found.setdefault(entry.name, folder)
    return found


def _view(frontal_lateral: str, ap_pa: str) -> str:
    if frontal_lateral.strip() == "Lateral":
        return "LATERAL"
    return ap_pa.strip() if ap_pa.strip() in ("AP", "PA") else "OTHER"

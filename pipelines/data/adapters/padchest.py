"""PadChest (BIMCV): one big CSV and 16-bit grayscale PNGs in numbered folders (``<ImageDir>/<ImageID>``).

``Labels`` is a Python-list string parsed with ``ast.literal_eval`` and matched item by item, never by
substring (``pericardial effusion`` is not a pleural effusion, ``abnormal foreign body`` is not ``normal``).
An image without a Labels list gets null labels; an assessed image lacking a label item is negative. An image
whose only items are ``exclude``, ``suboptimal study`` or ``unchanged`` was not assessed (the readers excluded it,
judged it unreadable, or only compared it with an earlier study): its labels are null and the row is marked
``non-assessable``, which prepare drops and counts — never a row of negatives. Ids are up to 39-digit strings.
Age is the study year minus the birth year: 0 is a real age here (infants born in the study year).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data.adapters._csv import find_file, read_csv
from pipelines.data.schema import LABELS, finalize_manifest, is_missing, parse_number, parse_sex, valid_age

CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
ITEMS = {
    "atelectasis": {"atelectasis", "total atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "laminar atelectasis", "round atelectasis", "atelectasis basal"},
    "cardiomegaly": {"cardiomegaly"},
    "pleural_effusion": {"pleural effusion", "loculated pleural effusion", "loculated fissural effusion",
                         "hydropneumothorax", "empyema", "hemothorax"},
    "pneumonia": {"pneumonia", "atypical pneumonia", "viral pneumonia"},
    "no_finding": {"normal"},
}
VIEW = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP", "L": "LATERAL"}
NOT_ASSESSED = frozenset({"exclude", "suboptimal study", "unchanged"})


def read(root: Path, site: str) -> pd.DataFrame:
    """Reads a PadChest copy into the common manifest.

    Args:
        root: folder with the labels CSV and the numbered image folders (or all PNGs flat).
        site: the configured site name.
    """
    raw = read_csv(find_file(root, CSV_NAME),
                   ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                    "PatientSex_DICOM", "Projection", "Labels"))
    parsed = [parse_items(cell) for cell in raw["Labels"]]
    not_assessed = [found is not None and bool(found) and found <= NOT_ASSESSED for found in parsed]
    items = [None if no else found for found, no in zip(parsed, not_assessed, strict=True)]
    out = pd.DataFrame({
        "image_id": raw["ImageID"],
        "patient_id": raw["PatientID"],
        "study_id": raw["StudyID"],
        "site": site,
        "path": [str(_image_path(root, d, i)) for d, i in zip(raw["ImageDir"], raw["ImageID"], strict=True)],
        "view": raw["Projection"].map(lambda v: VIEW.get(v.strip(), "OTHER")),
        "sex": raw["PatientSex_DICOM"].map(parse_sex),
        "age": [_age(d, b) for d, b in zip(raw["StudyDate_DICOM"], raw["PatientBirth"], strict=True)],
        "split": None,
        "excluded": ["non-assessable" if no else None for no in not_assessed],
    })
    for label in LABELS:
        out[label] = [np.nan if found is None else float(bool(found & ITEMS[label])) for found in items]
    return finalize_manifest(out)


def parse_items(cell: str) -> frozenset[str] | None:
    """The label items of a ``Labels`` cell, lower-cased and stripped; None when the cell is missing.

    Raises:
        ValueError: the cell is not a list literal.
    """
    if is_missing(cell):
        return None
    value = ast.literal_eval(cell.strip())
    if not isinstance(value, list):
        raise ValueError(f"PadChest column 'Labels' has {cell[:60]!r}, not a list such as \"['normal']\": is this "
                         f"the PadChest labels CSV?")
    return frozenset(item.strip().lower() for item in value if isinstance(item, str) and item.strip())


def _image_path(root: Path, image_dir: str, image_id: str) -> Path:
    number = parse_number(image_dir)
    nested = root / str(int(number)) / image_id if number is not None else None
    if nested is not None and nested.exists():
        return nested
    flat = root / image_id
    return flat if flat.exists() or nested is None else nested


def _age(study_date: str, birth_year: str) -> float | None:
    date, birth = parse_number(study_date), parse_number(birth_year)
    if date is None or birth is None:
        return None
    return valid_age(int(date) // 10000 - birth, zero_is_missing=False)

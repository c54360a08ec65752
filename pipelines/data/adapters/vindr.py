"""VinDr-CXR 1.0: ``annotations/image_labels_{train,test}.csv`` and DICOM files ``{train,test}/<image_id>.dicom``.

Each training image was labelled by three radiologists (three rows). ``majority`` (the default): a label is
positive when more than half of the readers marked it, ``No finding`` included. ``any``: a finding is positive
when any reader marked it, and ``No finding`` only when every reader marked it (one reader's finding rules it
out), so no image is both "no finding" and positive for a finding. The test file has one consensus row per
image and spells ``Other disease``. Sex and age exist only in the DICOM tags (``PatientSex``, ``PatientAge`` as
``045Y``). No patient id is published, so the image id stands in for it: patient-level leakage cannot be checked
here.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pydicom

from pipelines.data.adapters._csv import read_csv
from pipelines.data.schema import LABELS, finalize_manifest, parse_dicom_age, parse_number, parse_sex

LABEL_COLUMNS = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
                 "pleural_effusion": "Pleural effusion", "pneumonia": "Pneumonia", "no_finding": "No finding"}
AGGREGATIONS = ("majority", "any")


def read(root: Path, site: str, aggregation: str = "majority") -> pd.DataFrame:
    """Reads a VinDr-CXR copy into the common manifest.

    Args:
        root: folder with ``annotations/``, ``train/`` and ``test/``.
        site: the configured site name.
        aggregation: how the three radiologists' training labels combine, ``majority`` or ``any``.

    Raises:
        ValueError: unknown aggregation.
        FileNotFoundError: no label file.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"VinDr-CXR option aggregation {aggregation!r} is not one of {AGGREGATIONS}: fix the site's "
                         f"options in params.yaml")
    parts = []
    for split in ("train", "test"):
        path = root / "annotations" / f"image_labels_{split}.csv"
        if path.is_file():
            raw = read_csv(path, ("image_id", *LABEL_COLUMNS.values()))
            parts.append(_aggregate(raw, aggregation).assign(split=split))
    if not parts:
        raise FileNotFoundError(f"no annotations/image_labels_train.csv or _test.csv in {root}: point the site's "
                                f"path at the VinDr-CXR version folder")
    frame = pd.concat(parts, ignore_index=True)
    paths = [root / split / f"{image_id}.dicom"
             for image_id, split in zip(frame["image_id"], frame["split"], strict=True)]
    tags = [_demographics(p) for p in paths]
    out = frame.assign(
        patient_id=frame["image_id"], study_id=frame["image_id"], site=site, path=[str(p) for p in paths],
        view="PA", sex=[t[0] for t in tags], age=[t[1] for t in tags],
    )
    return finalize_manifest(out)


def _aggregate(raw: pd.DataFrame, aggregation: str) -> pd.DataFrame:
    values = pd.DataFrame({label: raw[column].map(lambda v: parse_number(v) or 0.0)
                           for label, column in LABEL_COLUMNS.items()})
    values["image_id"] = raw["image_id"]
    grouped = values.groupby("image_id", sort=False)
    if aggregation == "any":
        combined = grouped[list(LABELS)].max()
        combined["no_finding"] = grouped["no_finding"].min()
    else:
        counts = grouped[list(LABELS)].agg(["sum", "count"])
        combined = pd.DataFrame({label: (counts[(label, "sum")] * 2 > counts[(label, "count")]).astype(float)
                                 for label in LABELS})
    return combined.reset_index()


def _demographics(path: Path) -> tuple[str | None, float | None]:
    """Sex and age from the DICOM header alone (pixels are not read here); a missing file gives nulls."""
    if not path.is_file():
        return None, None
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientSex", "PatientAge"])
    return parse_sex(header.get("PatientSex")), parse_dicom_age(header.get("PatientAge"))

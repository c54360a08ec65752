"""CheXpert v1.0 (and -small): ``train.csv``/``valid.csv`` whose ``Path`` starts with the release folder.

Sex is ``Male``/``Female``/``Unknown``; ``Age`` 0 means missing. Labels are 1.0/0.0/-1.0/blank; ``No Finding``
is only 1.0 or blank. A frontal image is one with ``Frontal`` and ``AP/PA`` in {AP, PA}; the few frontal rows
marked ``LL``/``RL`` are suspicious and become ``OTHER``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from pipelines.data.adapters._csv import read_csv
from pipelines.data.schema import finalize_manifest, parse_label, parse_number, parse_sex, valid_age

LABEL_COLUMNS = {
    "atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia", "no_finding": "No Finding",
}
FILES = {"train.csv": "train", "valid.csv": "val", "test_labels.csv": "test"}
_PATIENT = re.compile(r"(patient\d+)/(study\d+)/")


def read(root: Path, site: str) -> pd.DataFrame:
    """Reads a CheXpert copy into the common manifest.

    Args:
        root: the release folder (``CheXpert-v1.0-small``) holding the CSVs and ``train/``, ``valid/``.
        site: the configured site name.

    Raises:
        FileNotFoundError: neither train.csv nor valid.csv is there.
    """
    parts = []
    for name, split in FILES.items():
        if (root / name).is_file():
            raw = read_csv(root / name, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABEL_COLUMNS.values()))
            parts.append(raw.assign(_split=split))
    if not parts:
        raise FileNotFoundError(f"no train.csv or valid.csv in {root}: point the site's path at the CheXpert folder")
    frame = pd.concat(parts, ignore_index=True)
    # Path is "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg": drop the release folder.
    relative = frame["Path"].map(lambda p: p.split("/", 1)[1] if "/" in p else p)
    ids = relative.map(_PATIENT.search)
    if ids.isna().any():
        bad = relative[ids.isna()].iloc[0]
        raise ValueError(f"CheXpert Path {bad!r} has no patientNNNNN/studyN part")
    out = pd.DataFrame({
        "image_id": relative,
        "patient_id": ids.map(lambda m: m.group(1)),
        "study_id": ids.map(lambda m: f"{m.group(1)}/{m.group(2)}"),
        "site": site,
        "path": relative.map(lambda p: str(root / p)),
        "view": [_view(f, a) for f, a in zip(frame["Frontal/Lateral"], frame["AP/PA"], strict=True)],
        "sex": frame["Sex"].map(parse_sex),
        "age": frame["Age"].map(lambda a: valid_age(parse_number(a))),
        "split": frame["_split"],
    })
    for label, column in LABEL_COLUMNS.items():
        out[label] = frame[column].map(parse_label)
    return finalize_manifest(out)


def _view(frontal_lateral: str, ap_pa: str) -> str:
    if frontal_lateral.strip() == "Lateral":
        return "LATERAL"
    return ap_pa.strip() if ap_pa.strip() in ("AP", "PA") else "OTHER"

"""In-house common schema (UKA-CXR's role in the study): ``masterlist.csv`` with the manifest's columns.

Paths in the masterlist are relative to the data set's root. Labels use 1/0/-1/blank like the manifest.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.data.adapters._csv import find_file, read_csv
from pipelines.data.schema import LABELS, VIEWS, finalize_manifest, parse_labels, parse_number, parse_sex, valid_age

REQUIRED = ("image_id", "patient_id", "study_id", "path", "view", "sex", "age", *LABELS)


def read(root: Path, site: str) -> pd.DataFrame:
    """Reads an in-house masterlist into the common manifest.

    Args:
        root: folder with ``masterlist.csv`` and the images it names.
        site: the configured site name.

    Raises:
        ValueError: a column is missing or a view or label value is not allowed.
    """
    path = find_file(root, "masterlist.csv")
    raw = read_csv(path, REQUIRED)
    bad_views = sorted(set(raw["view"].str.upper()) - VIEWS)
    if bad_views:
        raise ValueError(f"{path}: column 'view' has {bad_views}; allowed are {sorted(VIEWS)}")
    out = pd.DataFrame({
        "image_id": raw["image_id"],
        "patient_id": raw["patient_id"],
        "study_id": raw["study_id"],
        "site": site,
        "path": [str(root / p) for p in raw["path"]],
        "view": raw["view"].str.upper(),
        "sex": raw["sex"].map(parse_sex),
        "age": [valid_age(parse_number(a)) for a in raw["age"]],
        "split": raw["split"].replace("", None) if "split" in raw else None,
    })
    for label in LABELS:
        out[label] = parse_labels(raw[label], label, str(path))
    return finalize_manifest(out)

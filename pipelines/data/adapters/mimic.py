"""MIMIC-CXR-JPG 2.x: a JPEG tree, the metadata, split and CheXpert-labeler CSVs, and MIMIC-IV demographics.

Images are ``files/pXX/p<subject>/s<study>/<dicom_id>.jpg``; sex and age come from MIMIC-IV's patients table,
a separate download: ``hosp/patients.csv.gz`` in MIMIC-IV 2.x, ``core/patients.csv.gz`` in 1.0. It is found as
``patients.csv(.gz)`` in the version folder or its ``hosp/`` or ``core/``; elsewhere, the site's
``options: {patients_csv: <path>}`` names it (relative to the working directory, like the site's path).

Labels are per study and joined on (subject_id, study_id); a study without a label row gets null labels.
Age at the study is ``anchor_age + (study year - anchor_year)``; ``anchor_age`` 91 means "over 89" and is
capped at 90.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.data.adapters._csv import MissingColumns, find_file, read_csv
from pipelines.data.schema import finalize_manifest, parse_labels, parse_number, parse_sex, valid_age

LABEL_COLUMNS = {
    "atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia", "no_finding": "No Finding",
}
VIEW = {"PA": "PA", "AP": "AP", "LATERAL": "LATERAL", "LL": "LATERAL"}
SPLIT = {"train": "train", "validate": "val", "test": "test"}
TOP_CODED_AGE = 91
PATIENT_COLUMNS = ("subject_id", "gender", "anchor_age", "anchor_year")


def read(root: Path, site: str, patients_csv: str | Path | None = None) -> pd.DataFrame:
    """Reads a MIMIC-CXR-JPG copy into the common manifest.

    Args:
        root: the version folder (``.../mimic-cxr-jpg/2.0.0``) holding ``files/`` and the CSVs.
        site: the configured site name.
        patients_csv: MIMIC-IV's ``patients.csv(.gz)``; by default looked for in ``root``, ``root/hosp`` and
            ``root/core``.

    Raises:
        FileNotFoundError: a CSV is missing; for the patients table, the message names the option to set.
        ValueError: a CSV lacks a column; for the patients table, the message names the columns and the option.
    """
    meta = read_csv(find_file(root, "mimic-cxr-2.0.0-metadata.csv"),
                    ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"))
    split = read_csv(find_file(root, "mimic-cxr-2.0.0-split.csv"), ("dicom_id", "split"))
    labels_path = find_file(root, "mimic-cxr-2.0.0-chexpert.csv")
    labels = read_csv(labels_path, ("subject_id", "study_id", *LABEL_COLUMNS.values()))
    patients = _patients(root, patients_csv)

    frame = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="left")
    frame = frame.merge(labels, on=["subject_id", "study_id"], how="left")
    frame = frame.merge(patients[["subject_id", "gender", "anchor_age", "anchor_year"]], on="subject_id", how="left")

    out = pd.DataFrame({
        "image_id": frame["dicom_id"],
        "patient_id": frame["subject_id"],
        "study_id": frame["study_id"],
        "site": site,
        "path": [str(root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg")
                 for d, s, st in zip(frame["dicom_id"], frame["subject_id"], frame["study_id"], strict=True)],
        "view": frame["ViewPosition"].map(lambda v: VIEW.get(str(v).strip().upper(), "OTHER")),
        "sex": frame["gender"].map(parse_sex),
        "age": [_age_at_study(a, y, d)
                for a, y, d in zip(frame["anchor_age"], frame["anchor_year"], frame["StudyDate"], strict=True)],
        "split": frame["split"].map(lambda v: SPLIT.get(v) if isinstance(v, str) else None),
    })
    for label, column in LABEL_COLUMNS.items():
        out[label] = parse_labels(frame[column], column, str(labels_path))
    return finalize_manifest(out)


def _patients(root: Path, option: str | Path | None) -> pd.DataFrame:
    where = "set the site's options: {patients_csv: <MIMIC-IV>/hosp/patients.csv.gz} in params.yaml"
    if option is None:
        try:
            path = find_file(root, "patients.csv", "hosp/patients.csv", "core/patients.csv")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"MIMIC-IV's patients.csv(.gz) is not in {root}, {root / 'hosp'} or {root / 'core'}: it is a separate "
                f"download (MIMIC-IV 2.x hosp/, 1.0 core/); {where}") from None
    else:
        path = Path(option)
        if not path.is_file():
            raise FileNotFoundError(f"options.patients_csv: {path} does not exist; {where}")
    try:
        return read_csv(path, PATIENT_COLUMNS)
    except MissingColumns as error:
        raise ValueError(f"{path} lacks the columns {error.missing} of MIMIC-IV's patients table "
                         f"({', '.join(PATIENT_COLUMNS)}); {where}") from None


def _age_at_study(anchor_age: object, anchor_year: object, study_date: object) -> float | None:
    age, year = parse_number(anchor_age), parse_number(anchor_year)
    date = parse_number(study_date)
    if age is None or year is None or date is None:
        return None
    if age >= TOP_CODED_AGE:
        return 90.0
    return valid_age(min(age + (int(date) // 10000 - year), 90.0))

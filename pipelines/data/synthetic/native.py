"""Writes a synthetic site in the native layout of the real data set it mirrors.

Each writer gives the images their native ids and paths, writes the metadata files exactly as the real release
spells them, including the quirks the adapters must survive (uncertain and blank labels, distractor findings,
missing demographics, ages coded 0, MONOCHROME1 DICOMs), and returns one ``ImageFile`` per cohort row telling
the renderer where and how to encode the pixels.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data.schema import LABELS
from pipelines.data.synthetic.cohort import FINDINGS


@dataclass(frozen=True)
class ImageFile:
    """Where one rendered image goes and how it is encoded.

    Attributes:
        path: relative to the site folder.
        encoding: ``jpeg``, ``png8``, ``png16`` or ``dicom``.
        dicom: DICOM header fields (only for ``dicom``).
    """

    path: str
    encoding: str
    dicom: dict[str, str] = field(default_factory=dict)


def _hex(rng: np.random.Generator, n: int) -> str:
    return "".join(f"{v:x}" for v in rng.integers(0, 16, size=n))


def _digits(rng: np.random.Generator, n: int) -> str:
    return str(rng.integers(1, 10)) + "".join(str(v) for v in rng.integers(0, 10, size=n - 1))


def _write_csv(path: Path, header: list[str], rows: list[list[object]], line_suffix: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator=line_suffix + "\n")
        writer.writerow(header)
        writer.writerows(rows)


def _chexpert_cell(published: int, rng: np.random.Generator) -> str:
    """A CheXpert-labeler cell: positives sometimes uncertain, negatives mostly not mentioned."""
    draw = rng.random()
    if published:
        return "-1.0" if draw < 0.12 else "1.0"
    if draw < 0.05:
        return "-1.0"
    return "0.0" if draw < 0.35 else ""


CHEXPERT_OTHER = ["Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
                  "Pneumothorax", "Pleural Other", "Fracture", "Support Devices"]
CHEXPERT_NAMES = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
                  "pleural_effusion": "Pleural Effusion", "pneumonia": "Pneumonia"}


def _study_labels(cohort: pd.DataFrame, rng: np.random.Generator) -> dict[int, dict[str, str]]:
    """CheXpert/MIMIC-style label cells per study (labels are per study in both)."""
    cells = {}
    for study, row in cohort.groupby("study", sort=True).first().iterrows():
        cell = {CHEXPERT_NAMES[f]: _chexpert_cell(int(row[f]), rng) for f in FINDINGS}
        cell["No Finding"] = "1.0" if row["no_finding"] else ""
        for other in CHEXPERT_OTHER:
            cell[other] = "1.0" if (other == "Consolidation" and row["true_pneumonia"] and rng.random() < 0.5) else ""
        cells[study] = cell
    return cells


def write_mimic(cohort: pd.DataFrame, site_dir: Path, rng: np.random.Generator) -> list[ImageFile]:
    """MIMIC-CXR-JPG 2.0.0 plus MIMIC-IV ``patients.csv`` (a few subjects missing from it)."""
    root = site_dir / "2.0.0"
    # Real ids are 8 digits starting with 1 (subjects) and 5 (studies); spacing them keeps them unique.
    subjects = {p: str(10000032 + 17 * p) for p in sorted(cohort["patient"].unique())}
    studies = {s: str(50000014 + 31 * s) for s in sorted(cohort["study"].unique())}
    anchor = {p: int(rng.integers(2110, 2190)) for p in subjects}
    labels = _study_labels(cohort, rng)
    meta, split_rows, files = [], [], []
    split_of = {p: ("test" if u < 0.1 else "validate" if u < 0.18 else "train")
                for p, u in zip(subjects, rng.random(len(subjects)), strict=True)}
    first_age: dict[int, float] = {}
    for _, row in cohort.iterrows():
        sid, study = subjects[row["patient"]], studies[row["study"]]
        first_age.setdefault(row["patient"], row["age"])
        year = anchor[row["patient"]] + int(row["age"] - first_age[row["patient"]])
        dicom_id = "-".join(_hex(rng, 8) for _ in range(5))
        view = {"PA": "PA", "AP": "AP", "LATERAL": "LATERAL"}[row["view"]]
        meaning = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}[view]
        meta.append([dicom_id, sid, study, "CHEST (PA AND LAT)" if view != "AP" else "CHEST (PORTABLE AP)", view,
                     3056, 2544, f"{year}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
                     f"{rng.integers(0, 235959)}.0", "CHEST (PA AND LAT)", meaning, "Erect"])
        split_rows.append([dicom_id, study, sid, split_of[row["patient"]]])
        files.append(ImageFile(f"2.0.0/files/p{sid[:2]}/p{sid}/s{study}/{dicom_id}.jpg", "jpeg"))
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv",
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], meta)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    header = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
              "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
              "Pneumothorax", "Support Devices"]
    first = cohort.groupby("study", sort=True)["patient"].first()
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *header],
               [[subjects[first[s]], studies[s], *[labels[s][h] for h in header]] for s in sorted(labels)])
    people = cohort.groupby("patient", sort=True).first()
    patient_rows = [[subjects[p], row["sex"], min(int(first_age[p]), 91), anchor[p], "2014 - 2016", ""]
                    for p, row in people.iterrows() if rng.random() > 0.03]
    _write_csv(root / "patients.csv", ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
               patient_rows)
    return files


def write_inhouse(cohort: pd.DataFrame, site_dir: Path, rng: np.random.Generator) -> list[ImageFile]:
    """The in-house common schema: ``masterlist.csv`` plus 8-bit PNGs."""
    rows, files = [], []
    for index, row in cohort.iterrows():
        image_id = f"UKA-SYN-{index:07d}"
        path = f"images/{image_id}.png"
        rows.append([image_id, f"P{row['patient']:06d}", f"S{row['study']:07d}", path, row["view"], row["sex"],
                     row["age"], *[int(row[label]) for label in LABELS]])
        files.append(ImageFile(path, "png8"))
    _write_csv(site_dir / "masterlist.csv",
               ["image_id", "patient_id", "study_id", "path", "view", "sex", "age", *LABELS], rows)
    return files


def write_chexpert(cohort: pd.DataFrame, site_dir: Path, rng: np.random.Generator) -> list[ImageFile]:
    """CheXpert-v1.0-small: ``train.csv`` and ``valid.csv``; Age 0 and Sex Unknown for a few rows."""
    root = site_dir / "CheXpert-v1.0-small"
    labels = _study_labels(cohort, rng)
    valid_patients = {p for p in cohort["patient"].unique() if rng.random() < 0.15}
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
              "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
              "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
    out: dict[str, list[list[object]]] = {"train": [], "valid": []}
    files = []
    view_index: dict[int, int] = {}
    for _, row in cohort.iterrows():
        part = "valid" if row["patient"] in valid_patients else "train"
        view_index[row["study"]] = view_index.get(row["study"], 0) + 1
        kind = "lateral" if row["view"] == "LATERAL" else "frontal"
        relative = (f"{part}/patient{row['patient'] + 1:05d}/study{row['study_in_patient'] + 1}/"
                    f"view{view_index[row['study']]}_{kind}.jpg")
        sex = "Unknown" if rng.random() < 0.01 else {"F": "Female", "M": "Male"}[row["sex"]]
        age = 0 if rng.random() < 0.01 else int(min(row["age"], 90))
        cells = dict(labels[row["study"]])
        if part == "valid":   # radiologist consensus: only 0/1
            cells = {k: ("1.0" if v == "1.0" else "0.0") for k, v in cells.items()}
        out[part].append([f"CheXpert-v1.0-small/{relative}", sex, age,
                          "Lateral" if kind == "lateral" else "Frontal", "" if kind == "lateral" else row["view"],
                          *[cells[h] for h in header[5:]]])
        files.append(ImageFile(f"CheXpert-v1.0-small/{relative}", "jpeg"))
    _write_csv(root / "train.csv", header, out["train"])
    _write_csv(root / "valid.csv", header, out["valid"])
    return files


def write_chestxray14(cohort: pd.DataFrame, site_dir: Path, rng: np.random.Generator) -> list[ImageFile]:
    """ChestX-ray14 v2020 entry file, Kaggle-style ``images_00N/images`` folders and the split lists."""
    tokens = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "pleural_effusion": "Effusion",
              "pneumonia": "Pneumonia"}
    rows, files, test, train_val = [], [], [], []
    test_patients = {p for p in cohort["patient"].unique() if rng.random() < 0.3}
    follow_up: dict[int, int] = {}
    for index, row in cohort.iterrows():
        patient = int(row["patient"]) + 1
        follow_up[patient] = follow_up.get(patient, -1) + 1
        name = f"{patient:08d}_{follow_up[patient]:03d}.png"
        found = [tokens[f] for f in FINDINGS if row[f]]
        # NLP-mined labels come with findings that are not pneumonia but sound like it.
        if row["true_pneumonia"] and rng.random() < 0.5:
            found.append("Infiltration")
        finding = "|".join(sorted(found)) if found else "No Finding"
        age = 0 if rng.random() < 0.01 else int(row["age"])
        rows.append([name, finding, follow_up[patient], patient, age, row["sex"], row["view"], 2500, 2048,
                     0.143, 0.143])
        (test if row["patient"] in test_patients else train_val).append(name)
        files.append(ImageFile(f"images_{1 + index // 250:03d}/images/{name}", "png8"))
    _write_csv(site_dir / "Data_Entry_2017_v2020.csv",
               ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"], rows)
    (site_dir / "test_list.txt").write_text("".join(f"{n}\n" for n in test))
    (site_dir / "train_val_list.txt").write_text("".join(f"{n}\n" for n in train_val))
    return files


PADCHEST_ITEMS = {"atelectasis": ["laminar atelectasis", "atelectasis", "atelectasis basal"],
                  "cardiomegaly": ["cardiomegaly"], "pleural_effusion": ["pleural effusion"],
                  "pneumonia": ["pneumonia", "atypical pneumonia"]}
PADCHEST_DISTRACTORS = ["pericardial effusion", "abnormal foreign body", "chronic changes", "aortic elongation"]
PADCHEST_HEADER = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                   "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
                   "Modality_DICOM", "Manufacturer_DICOM", "PhotometricInterpretation_DICOM",
                   "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM", "SpatialResolution_DICOM",
                   "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM",
                   "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
                   "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
                   "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS"]


def write_padchest(cohort: pd.DataFrame, site_dir: Path, rng: np.random.Generator) -> list[ImageFile]:
    """PadChest labels CSV (leading unnamed index, list strings, 39-digit ids) and 16-bit PNGs."""
    patients = {p: _digits(rng, 39) for p in sorted(cohort["patient"].unique())}
    studies = {s: _digits(rng, 38) for s in sorted(cohort["study"].unique())}
    years = {s: int(rng.integers(2009, 2018)) for s in studies}
    rows, files = [], []
    for index, row in cohort.iterrows():
        study = studies[row["study"]]
        image_id = f"{study}_{_hex(rng, 6)}.png"
        image_dir = index // 200
        items = [rng.choice(PADCHEST_ITEMS[f]) for f in FINDINGS if row[f]] or ["normal"]
        if rng.random() < 0.1:
            items.append(rng.choice(PADCHEST_DISTRACTORS))
        labels = "nan" if rng.random() < 0.01 else "[" + ", ".join(f"'{i}'" for i in items) + "]"
        birth = "" if rng.random() < 0.02 else f"{years[row['study']] - int(row['age'])}.0"
        sex = "O" if rng.random() < 0.005 else row["sex"]
        projection = {"PA": "PA", "AP": "AP_horizontal", "LATERAL": "L"}[row["view"]]
        rows.append([index, image_id, image_dir, f"{years[row['study']]}0315", study, patients[row["patient"]], birth,
                     sex, "", projection, "Manual review of DICOM fields", "No", "CR", "PhilipsMedicalSystems",
                     "MONOCHROME2", 0, "", 0.143, 12, 2047.0, 4095.0, 2140, 1760, "", "", "None", "", "",
                     4000000 + row["study"], "synthetic report .", "Physician", labels, "[]", "[]", "[]", "[]"])
        files.append(ImageFile(f"{image_dir}/{image_id}", "png16"))
    _write_csv(site_dir / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", PADCHEST_HEADER, rows)
    return files


VINDR_LABELS = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
                "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD",
                "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]
VINDR_NAMES = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural effusion",
               "pneumonia": "Pneumonia"}


def write_vindr(cohort: pd.DataFrame, site_dir: Path, rng: np.random.Generator) -> list[ImageFile]:
    """VinDr-CXR: three radiologist rows per training image, consensus test rows, DICOMs with demographics."""
    train_rows, test_rows, files = [], [], []
    for _, row in cohort.iterrows():
        image_id = _hex(rng, 32)
        split = "test" if rng.random() < 0.2 else "train"
        readers = [row] if split == "test" else [row, row, row]
        for number, reader in enumerate(readers):
            # Each radiologist misses or over-calls a finding now and then.
            found = {VINDR_NAMES[f]: int(reader[f]) ^ int(split == "train" and rng.random() < 0.05) for f in FINDINGS}
            values = [found.get(name, 0) for name in VINDR_LABELS[:-1]]
            values.append(int(not any(found.values())))
            if split == "test":
                test_rows.append([image_id, *values])
            else:
                train_rows.append([image_id, f"R{rng.integers(1, 18) if number else number + 1}", *values])
        age = "" if rng.random() < 0.15 else f"{int(row['age']):03d}Y"
        sex = "" if rng.random() < 0.05 else row["sex"]
        photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
        files.append(ImageFile(f"{split}/{image_id}.dicom", "dicom",
                               {"PatientSex": sex, "PatientAge": age, "PhotometricInterpretation": photometric,
                                "SOPInstanceUID": image_id}))
    _write_csv(site_dir / "annotations" / "image_labels_train.csv", ["image_id", "rad_id", *VINDR_LABELS], train_rows)
    test_header = ["image_id", *[("Other disease" if n == "Other diseases" else n) for n in VINDR_LABELS]]
    _write_csv(site_dir / "annotations" / "image_labels_test.csv", test_header, test_rows)
    return files


WRITERS: dict[str, Callable[[pd.DataFrame, Path, np.random.Generator], list[ImageFile]]] = {
    "mimic-cxr-jpg": write_mimic, "inhouse": write_inhouse, "chexpert": write_chexpert,
    "chestxray14": write_chestxray14, "padchest": write_padchest, "vindr-cxr": write_vindr,
}

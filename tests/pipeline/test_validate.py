"""The Great Expectations gate: valid metadata passes; each injected defect fails, naming its check."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.config import load_params
from pipelines.data.schema import LABELS
from pipelines.data.splits import patient_splits
from pipelines.data.synthetic.cohort import SITES, sample_cohort
from pipelines.stage import StageError
from pipelines.validate import validate

REPO = Path(__file__).resolve().parents[2]
PRIVATE, PUBLIC, EXTERNAL = "synthetic-uka-cxr-inhouse", "synthetic-mimic-cxr-jpg", "synthetic-chexpert"
LEAK_PATIENT, LEAK_IMAGE = "PATIENT-LEAK-4711", "IMAGE-LEAK-0815"


def site_metadata(name: str, role: str, seed: int) -> pd.DataFrame:
    """Prepared-style metadata of a synthetic site (metadata only: the gate never reads pixels)."""
    spec = next(s for s in SITES if s.name == name)
    cohort = sample_cohort(spec, 0.5, np.random.default_rng(seed))
    cohort = cohort[cohort["view"] != "LATERAL"].reset_index(drop=True)
    rng = np.random.default_rng(seed + 100)
    frame = pd.DataFrame({
        "image_id": [f"{name[:6]}-img-{i:06d}" for i in range(len(cohort))],
        "patient_id": [f"{name[:6]}-pat-{p:05d}" for p in cohort["patient"]],
        "study_id": [f"{name[:6]}-st-{s:06d}" for s in cohort["study"]],
        "site": name, "path": "unused", "view": cohort["view"], "sex": cohort["sex"], "age": cohort["age"],
        "split": "test", "source_split": None,
        **{label: cohort[label].astype(int) for label in LABELS},
        "content_hash": [f"{v:064x}" for v in rng.integers(0, 2**62, size=len(cohort))],
    })
    if role == "private":
        frame["split"] = patient_splits(frame["patient_id"], 0.15, 0.2, seed=0)
    return frame


@pytest.fixture
def gate(tmp_path, monkeypatch):
    """A working directory with three sites' valid metadata and a params.yaml naming just those sites."""
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["sites"] = {k: v for k, v in raw["data"]["sites"].items() if k in (PRIVATE, PUBLIC, EXTERNAL)}
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    frames = {name: site_metadata(name, raw["data"]["sites"][name]["role"], seed)
              for seed, name in enumerate((PRIVATE, PUBLIC, EXTERNAL))}

    def run(mutate=None, data_docs=False) -> dict:
        data = {name: frame.copy() for name, frame in frames.items()}
        if mutate:
            mutate(data)
        for name, frame in data.items():
            folder = Path("artifacts/prepare") / name
            folder.mkdir(parents=True, exist_ok=True)
            frame.to_csv(folder / "metadata.csv", index=False)
        params = load_params(Path("params.yaml"))
        try:
            validate(params, data_docs=data_docs)
        except StageError:
            pass
        return json.loads(Path("artifacts/validate/summary.json").read_text())

    return run


def failed_checks(summary: dict) -> set[tuple[str, str, str]]:
    return {(f["site"], f["check"], f["column"]) for f in summary["failures"]}


def test_valid_metadata_passes_and_writes_results_and_data_docs(gate):
    summary = gate(data_docs=True)
    assert summary["success"], summary["failures"]
    assert summary["evaluated"] > 100
    assert Path("artifacts/validate/results.json").is_file()
    assert Path("artifacts/validate/data_docs/index.html").is_file()


def set_cell(site, column, value, row=0):
    def mutate(data):
        data[site].loc[row, column] = value
    return mutate


def private_patient_in_train_and_test(data):
    frame = data[PRIVATE]
    train = frame.index[frame["split"] == "train"][0]
    test = frame.index[frame["split"] == "test"][0]
    frame.loc[test, "patient_id"] = frame.loc[train, "patient_id"]


def no_positive_in_test(data):
    frame = data[PRIVATE]
    frame.loc[frame["split"] == "test", "pneumonia"] = 0


def drop_column(data):
    data[EXTERNAL] = data[EXTERNAL].drop(columns=["age"])


def one_sex(data):
    frame = data[PUBLIC]
    frame.loc[frame.index[: int(len(frame) * 0.97)], "sex"] = "F"
    frame.loc[frame.index[int(len(frame) * 0.97):], "sex"] = "M"


def empty_age_bin(data):
    frame = data[EXTERNAL]
    frame.loc[frame["age"] >= 80, "age"] = 75.0


def public_content_in_private(data):
    data[PRIVATE].loc[3, "content_hash"] = data[PUBLIC].loc[5, "content_hash"]


def duplicate_image(data):
    data[PRIVATE].loc[1, "image_id"] = data[PRIVATE].loc[0, "image_id"]


DEFECTS = {
    "sex X": (set_cell(PRIVATE, "sex", "X"), (PRIVATE, "sex.values", "sex")),
    "age -3": (set_cell(PUBLIC, "age", -3.0), (PUBLIC, "age.range", "age")),
    "age 250": (set_cell(EXTERNAL, "age", 250.0), (EXTERNAL, "age.range", "age")),
    "null patient_id": (set_cell(PRIVATE, "patient_id", None), (PRIVATE, "ids.not_null", "patient_id")),
    "duplicate image_id": (duplicate_image, (PRIVATE, "ids.image_unique", "image_id")),
    "patient in train and test": (private_patient_in_train_and_test,
                                  (PRIVATE, "splits.patient_in_one_split", "splits_per_patient")),
    "label value 2": (set_cell(PUBLIC, "cardiomegaly", 2), (PUBLIC, "labels.binary", "cardiomegaly")),
    "no positive in test": (no_positive_in_test, (PRIVATE, "splits.test_has_both_classes", "pneumonia")),
    "missing column": (drop_column, (EXTERNAL, "schema.column_exists", "age")),
    "97% one sex": (one_sex, (PUBLIC, "sex.share", "is_female")),
    "empty age bin in test": (empty_age_bin, (EXTERNAL, "age.bin_in_test_split", "age_bin_80_100")),
    "public content in private": (public_content_in_private, (PRIVATE, "privacy.no_public_overlap", "in_public_source")),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_fails_naming_its_check(gate, defect):
    mutate, expected = DEFECTS[defect]
    summary = gate(mutate)
    assert not summary["success"]
    assert expected in failed_checks(summary), summary["failures"]


def test_age_defects_are_counted(gate):
    def two_bad_ages(data):
        data[PRIVATE].loc[0, "age"] = -3.0
        data[PRIVATE].loc[1, "age"] = 250.0

    failure = next(f for f in gate(two_bad_ages)["failures"] if f["check"] == "age.range")
    assert failure["count"].startswith("2 of ")


def test_stored_results_never_hold_injected_identifiers_or_values(gate):
    def leak(data):
        frame = data[PRIVATE]
        frame.loc[0, "patient_id"] = LEAK_PATIENT
        frame.loc[1, "patient_id"] = LEAK_PATIENT              # same patient ...
        frame.loc[0, "split"], frame.loc[1, "split"] = "train", "test"   # ... in two splits
        frame.loc[2, "image_id"] = LEAK_IMAGE
        frame.loc[3, "image_id"] = LEAK_IMAGE                  # duplicate image id
        frame.loc[4, "sex"] = "Xylophone"
        frame.loc[5, "age"] = 987.654

    summary = gate(leak, data_docs=True)
    assert not summary["success"]
    stored = "".join(p.read_text(errors="ignore") for p in Path("artifacts/validate").rglob("*") if p.is_file())
    for secret in (LEAK_PATIENT, LEAK_IMAGE, "Xylophone", "987.654"):
        assert secret not in stored


def test_command_line_exits_non_zero_with_a_table(gate, capsys):
    from pipelines.validate import main

    gate(set_cell(PRIVATE, "sex", "X"))                  # writes the defective metadata
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2
    assert "sex.values" in stderr and "1 of " in stderr
    assert stderr.strip().splitlines()[-1].startswith("validate: error: 1 expectation(s) failed")

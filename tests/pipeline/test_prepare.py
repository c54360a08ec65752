"""The prepare stage on the tiny synthetic data set: store, splits, corrupt images, dropped rows, atomic outputs."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import load_params
from pipelines.data.schema import LABELS
from pipelines.data.store import open_site
from pipelines.prepare import prepare
from pipelines.stage import StageError
from pipelines.validate import validate


def test_prepare_writes_a_store_per_site(workspace):
    params = load_params(Path("params.yaml"), ["base.image_size=32"])
    report = prepare(params)
    out = Path("artifacts/prepare")
    assert json.loads((out / "report.json").read_text())["images"] == report["images"] > 0
    assert "seconds" not in json.loads((out / "report.json").read_text())    # deterministic DVC output
    for name, site in params.data.sites.items():
        store = open_site(out / name)
        assert store.images.shape == (len(store.metadata), 32, 32) and store.images.dtype == np.uint8
        assert set(store.metadata["view"]) <= {"PA", "AP"}
        for label in LABELS:
            assert set(store.metadata[label].unique()) <= {0, 1}
        if site.role == "external":
            assert set(store.metadata["split"]) == {"test"}
    private = open_site(out / params.private_site()).metadata
    assert set(private["split"]) == {"train", "val", "test"}
    patients = [set(private.loc[private["split"] == s, "patient_id"]) for s in ("train", "val", "test")]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
    # The store holds the preprocessed pixels of the listed file and its near-duplicate signature.
    from models.preprocessing import decode_file, load_image
    from pipelines.data.source import signature
    first, store = private.iloc[0], open_site(out / params.private_site())
    assert np.array_equal(store.images[0], load_image(Path(first["path"]), 32))
    assert np.array_equal(store.signatures[0], signature(decode_file(Path(first["path"]))))
    assert not list(Path("artifacts").glob(".*partial"))


def test_splits_are_deterministic(workspace):
    params = load_params(Path("params.yaml"), ["base.image_size=16"])
    prepare(params)
    first = open_site(Path("artifacts/prepare") / params.private_site()).metadata[["image_id", "split"]]
    prepare(params)
    second = open_site(Path("artifacts/prepare") / params.private_site()).metadata[["image_id", "split"]]
    assert first.equals(second)


def corrupt_one_private_image(params) -> Path:
    site = params.data.sites[params.private_site()]
    victim = sorted(Path(site.path, "images").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:100])   # truncated
    return victim


def test_corrupt_image_is_skipped_and_reported(workspace):
    params = load_params(Path("params.yaml"), ["base.image_size=16", "prepare.max_bad_fraction=0.5"])
    victim = corrupt_one_private_image(params)
    report = prepare(params)
    site = report["sites"][params.private_site()]
    assert site["bad"] == 1 and site["images"] == site["frontal"] - 1
    assert site["bad_images"][0]["path"] == str(victim)
    assert "truncated or corrupt PNG" in site["bad_images"][0]["reason"]
    store = open_site(Path("artifacts/prepare") / params.private_site())
    assert victim.name.removesuffix(".png") not in set(store.metadata["image_id"])


def test_too_many_bad_images_fail_and_leave_the_previous_outputs(workspace):
    good = load_params(Path("params.yaml"), ["base.image_size=16"])
    prepare(good)
    before = (Path("artifacts/prepare") / "report.json").read_text()
    strict = load_params(Path("params.yaml"), ["base.image_size=16", "prepare.max_bad_fraction=0.0"])
    corrupt_one_private_image(strict)
    with pytest.raises(StageError, match=r"1 of \d+ images unreadable .*prepare.max_bad_fraction=0.0"):
        prepare(strict)
    assert (Path("artifacts/prepare") / "report.json").read_text() == before
    assert not list(Path("artifacts").glob(".*partial"))


def test_command_line_errors_are_one_line(workspace):
    result = subprocess.run([sys.executable, "-m", "pipelines.prepare", "-P", "prepare.wokers=1"],
                            capture_output=True, text=True, cwd=workspace)
    assert result.returncode == 2
    assert result.stderr.strip() == ("prepare: error: override 'prepare.wokers=1': unknown key 'prepare.wokers' "
                                     "(did you mean workers?)")
    Path("params.yaml").write_text(Path("params.yaml").read_text().replace("  workers: 2", "  workers: 2\n  wokers: 1"))
    result = subprocess.run([sys.executable, "-m", "pipelines.prepare"], capture_output=True, text=True, cwd=workspace)
    assert result.returncode == 2
    assert result.stderr.strip() == "prepare: error: unknown key prepare.wokers in params.yaml (did you mean workers?)"
    Path("params.yaml").write_text(Path("params.yaml").read_text().replace("\n  wokers: 1", ""))
    Path("params.yaml").write_text(Path("params.yaml").read_text().replace(
        "path: data/synthetic-padchest", "path: data/missing-padchest"))
    result = subprocess.run([sys.executable, "-m", "pipelines.prepare"], capture_output=True, text=True, cwd=workspace)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "data/missing-padchest does not exist" in result.stderr
    assert not Path("artifacts/prepare").exists()


def rewrite_padchest(site_path: Path, change) -> None:
    """Edits the PadChest CSV with the csv module, so its unnamed first column and quoting stay as released."""
    path = site_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    change(rows[0], rows[1:])
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.mark.slow   # prepare of every site and two validate runs: in `make test`, not `make check`
def test_report_counts_each_dropped_and_filled_row_and_the_gate_bounds_the_dropped_share(workspace):
    params = load_params(Path("params.yaml"), ["base.image_size=16", "prepare.max_bad_fraction=0.5"])
    padchest = Path(params.data.sites["synthetic-padchest"].path)
    edited: dict[str, str] = {}

    def change(header, rows):
        column = {name: i for i, name in enumerate(header)}
        frontal = [r for r in rows if r[column["Projection"]] in ("PA", "AP", "AP_horizontal")]
        edited["unlabelled_before"] = sum(r[column["Labels"]] in ("nan", "") for r in frontal)
        assessed = [r for r in frontal if r[column["Labels"]].startswith("['")]
        for r, labels in zip(assessed, ["['exclude']", "['suboptimal study']", "['unchanged']", "nan"], strict=False):
            r[column["Labels"]] = labels
        edited["unreadable"] = assessed[4][column["ImageID"]]
        edited["excluded"] = [r[column["ImageID"]] for r in assessed[:3]]
        edited["frontal"] = len(frontal)
        edited["non_frontal"] = len(rows) - len(frontal)

    rewrite_padchest(padchest, change)
    victim = next(padchest.rglob(edited["unreadable"]))
    victim.write_bytes(victim.read_bytes()[:80])
    site = prepare(params)["sites"]["synthetic-padchest"]
    assert site["frontal"] == edited["frontal"]
    assert site["dropped"] == {"non_frontal": edited["non_frontal"], "non_assessable": 3,
                               "unlabelled": edited["unlabelled_before"] + 1, "unreadable": 1}
    assert site["images"] == site["frontal"] - 3 - site["dropped"]["unlabelled"] - 1
    stored = open_site(Path("artifacts/prepare/synthetic-padchest")).metadata
    assert not set(edited["excluded"]) & set(stored["image_id"]) and "excluded" not in stored.columns
    assert site["missing"] == {"sex": int(stored["sex"].isna().sum()), "age": int(stored["age"].isna().sum())}
    # CheXpert leaves most labels blank (not mentioned) and marks some uncertain: the policy filled those rows.
    chexpert = json.loads(Path("artifacts/prepare/report.json").read_text())["sites"]["synthetic-chexpert"]
    assert 0 < chexpert["labels_filled"]["uncertain"] < chexpert["labels_filled"]["not_mentioned"] <= chexpert["images"]

    share = (3 + site["dropped"]["unlabelled"] + 1) / site["frontal"]
    for limit, fails in ((share - 0.01, True), (share + 0.01, False)):
        try:
            validate(load_params(Path("params.yaml"), [f"validate.max_dropped_fraction={limit:.4f}"]),
                     data_docs=False)
        except StageError:
            pass
        failures = json.loads(Path("artifacts/validate/summary.json").read_text())["failures"]
        assert (("synthetic-padchest", "rows.dropped_share") in {(f["site"], f["check"]) for f in failures}) == fails

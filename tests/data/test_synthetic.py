"""The synthetic multi-site data set: deterministic, in native formats, realistic enough to be useful."""

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.preprocessing import decode_file
from pipelines.config import load_params
from pipelines.data.adapters import read_manifest
from pipelines.data.schema import FRONTAL_VIEWS
from pipelines.data.synthetic.cohort import SITES, sample_cohort
from pipelines.data.synthetic.generate import generate

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_same_seed_gives_identical_files_whatever_the_workers(tmp_path):
    one, two, other = tmp_path / "one", tmp_path / "two", tmp_path / "other"
    generate(one, seed=7, scale=0.02, workers=1)
    generate(two, seed=7, scale=0.02, workers=2)
    assert tree_digest(one) == tree_digest(two)
    generate(other, seed=8, scale=0.02, workers=2)
    assert tree_digest(other).keys() & tree_digest(one).keys()
    assert tree_digest(other) != tree_digest(one)
    assert not (tmp_path / ".one.partial").exists()


def test_public_scale_grows_the_public_source_alone(tmp_path):
    from pipelines.data.synthetic.generate import write_metadata

    def images(public_scale):
        tasks = write_metadata(tmp_path / str(public_scale), 7, 0.05, SITES, public_scale)
        return {site.name: sorted(str(t.path.relative_to(tmp_path / str(public_scale))) for t in tasks
                                  if t.path.relative_to(tmp_path / str(public_scale)).parts[0] == site.name)
                for site in SITES}

    once, thrice = images(1.0), images(3.0)
    public = next(site.name for site in SITES if site.role == "public")
    assert 2.5 < len(thrice[public]) / len(once[public]) < 3.5
    assert {k: v for k, v in thrice.items() if k != public} == {k: v for k, v in once.items() if k != public}


def test_every_site_is_named_synthetic_and_read_by_its_real_adapter(tiny_data):
    params = load_params(REPO_PARAMS)
    assert {s.name for s in SITES} == set(params.data.sites)
    for name, site in params.data.sites.items():
        assert "synthetic" in name
        root = tiny_data / Path(site.path).relative_to("data")
        manifest = read_manifest(site.format, root, name, **site.options)
        assert len(manifest) > 10, name
        assert all(Path(p).is_file() for p in manifest["path"]), name
        assert manifest["view"].isin(FRONTAL_VIEWS).mean() > 0.5, name
    assert "SYNTHETIC" in (tiny_data / "README.md").read_text()


def test_native_encodings(tiny_data):
    padchest = next((tiny_data / "synthetic-padchest").rglob("*.png"))
    with open(padchest, "rb") as handle:
        from PIL import Image
        assert Image.open(handle).mode.startswith("I;16")
    dicoms = list((tiny_data / "synthetic-vindr-cxr").rglob("*.dicom"))
    photometric = {pydicom.dcmread(p, stop_before_pixels=True).PhotometricInterpretation for p in dicoms}
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    # Decoded, a MONOCHROME1 radiograph looks like any other: dark lungs, bright mediastinum.
    for path in dicoms[:6]:
        image = decode_file(path)
        h, w = image.shape
        lung = image[int(h * 0.35):int(h * 0.5), int(w * 0.2):int(w * 0.3)].mean()
        spine = image[int(h * 0.35):int(h * 0.5), int(w * 0.48):int(w * 0.52)].mean()
        assert spine > lung, path


def test_prevalence_depends_on_age_and_sex():
    spec = next(s for s in SITES if s.role == "private")
    cohort = sample_cohort(spec, 1.0, np.random.default_rng(0))
    old, young = cohort[cohort["age"] >= 70], cohort[cohort["age"] < 50]
    assert old["true_cardiomegaly"].mean() > young["true_cardiomegaly"].mean() + 0.1
    men, women = cohort[cohort["sex"] == "M"], cohort[cohort["sex"] == "F"]
    assert men["true_cardiomegaly"].mean() > women["true_cardiomegaly"].mean()
    # Follow-ups: several images for some patients; published labels carry some noise.
    assert cohort.groupby("patient").size().max() > 1
    flipped = (cohort["pneumonia"] != cohort["true_pneumonia"]).mean()
    assert 0 < flipped < 0.1

"""The committed data.dvc is exactly what `make data` generates from params.yaml on a fresh machine.

Rendering all ~7,900 images takes minutes, so the check is split. DVC's directory hash is the MD5 of its file
listing (path and MD5 of every file), kept beside this test (`make data` refreshes it): the listing is checked to be
the one data.dvc names, every metadata file is regenerated and compared with it, the generator must plan exactly the
listed images, and a sample of images is rendered and compared: every site's first and last image, one of each view
and one of each finding per site, and a fresh random draw each run. Each image is rendered from its own seeds, so a
sample renders exactly as the whole run would (`make demo` regenerates everything and warns on any difference).
"""

import gzip
import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_params
from pipelines.data.synthetic.cohort import FINDINGS, SITES
from pipelines.data.synthetic.generate import render_one, write_metadata

REPO = Path(__file__).resolve().parents[2]
LISTING = Path(__file__).with_name("data_dvc_listing.json.gz")
RANDOM_PER_SITE = 8


def committed_listing() -> dict[str, str]:
    """The committed data.dvc's files: relative path -> MD5, checked against data.dvc's directory hash."""
    raw = gzip.decompress(LISTING.read_bytes())
    committed = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert hashlib.md5(raw).hexdigest() + ".dir" == committed["md5"], (
        f"{LISTING.name} is not the listing of data.dvc: run `make data` and commit both")
    listing = {entry["relpath"]: entry["md5"] for entry in json.loads(raw)}
    assert len(listing) == committed["nfiles"]
    return listing


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_the_listing_is_the_one_data_dvc_names():
    listing = committed_listing()
    assert sum(path.endswith(".csv") for path in listing) >= len(SITES)


@pytest.mark.slow
def test_committed_data_dvc_matches_the_generated_default(tmp_path):
    listing = committed_listing()
    params = load_params(REPO / "params.yaml")
    out = tmp_path / "data"
    synthetic = params.data.synthetic
    tasks = write_metadata(out, synthetic.seed, synthetic.scale, SITES, synthetic.public_scale)
    images = {str(task.path.relative_to(out)): task for task in tasks}
    metadata = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert sorted(metadata | set(images)) == sorted(listing), "the generator changed: run `make data` and commit"
    assert {path: md5(out / path) for path in metadata} == {path: listing[path] for path in metadata}

    seed = int.from_bytes(os.urandom(4), "little")
    draw = random.Random(seed)
    chosen: set[str] = set()
    for site in SITES:
        own = [path for path, task in images.items() if path.startswith(f"{site.name}/")]
        chosen |= {own[0], own[-1], *draw.sample(own, min(RANDOM_PER_SITE, len(own)))}
        for view in {images[path].subject.view for path in own}:
            chosen.add(next(path for path in own if images[path].subject.view == view))
        for finding in FINDINGS:
            chosen.add(next((path for path in own if images[path].labels[finding]), own[0]))
    for path in sorted(chosen):
        render_one(images[path])
    differing = sorted(path for path in chosen if md5(out / path) != listing[path])
    assert not differing, (f"{len(differing)} of {len(chosen)} sampled images differ from data.dvc (random draw "
                           f"{seed}), e.g. {differing[0]}: the generator changed: run `make data` and commit")

"""The committed data.dvc is exactly what `make data` generates from params.yaml on a fresh machine."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_params
from pipelines.data.synthetic.generate import generate

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_committed_data_dvc_matches_the_generated_default(tmp_path):
    params = load_params(REPO / "params.yaml")
    generate(tmp_path / "data", seed=params.data.synthetic.seed, scale=params.data.synthetic.scale, workers=2)
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "add", "-q", "data"], cwd=tmp_path, check=True)
    generated = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    committed = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert (generated["md5"], generated["nfiles"]) == (committed["md5"], committed["nfiles"]), (
        "the generator changed: run `make data` and commit data.dvc")

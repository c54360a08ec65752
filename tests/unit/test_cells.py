"""One name per grid cell: DVC's matrix stage key, the --cell flag, the output folder and the MLflow run name."""

import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.cells import cell_name, parse_cell, run_name
from pipelines.config import load_params

REPO = Path(__file__).resolve().parents[2]


def test_names_and_their_parts_round_trip():
    assert cell_name("scratch", 8.0, "atto", 1.0, 0) == "scratch-8-atto-1.0-0"
    assert cell_name("domain", float("inf"), "tiny", 0.25, 3) == "domain-inf-tiny-0.25-3"
    assert cell_name("checkpoint:my-model", 0.5, "atto", 1.0, 0) == "checkpoint:my-model-0.5-atto-1.0-0"
    assert parse_cell("checkpoint:my-model-0.5-atto-1.0-0") == {
        "init": "checkpoint:my-model", "epsilon": "0.5", "model": "atto", "data_fraction": "1.0", "seed": "0"}
    with pytest.raises(ValueError, match="is not <init>-<epsilon>"):
        parse_cell("scratch-8-atto")


@pytest.mark.parametrize("grid", [{}, {"epsilons": [0.5, 3, "inf"], "data_fractions": [0.25, 1.0], "seeds": [0, 1]}])
def test_dvc_names_every_matrix_stage_and_its_output_after_the_cell(tmp_path, grid):
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((REPO / name).read_text())
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["grid"].update(grid)
    raw["register"]["aliases"] = {"champion": 3 if grid else 8, "non-private-baseline": "inf"}
    if grid:
        raw["audit"]["cells"] = ["domain-3-atto-0.25-1", "scratch-inf-atto-1.0-0"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    from dvc.repo import Repo

    Repo.init(str(tmp_path))
    with Repo(str(tmp_path)) as repo:
        stages = {s.name: s for s in repo.index.stages if s.name.startswith("train@")}
        audits = {s.name: s for s in repo.index.stages if s.name.startswith("audit@")}
    params = load_params(tmp_path / "params.yaml")
    assert sorted(audits) == sorted(f"audit@{cell}" for cell in params.audit.cells)
    for cell in params.audit.cells:
        assert audits[f"audit@{cell}"].cmd == f"python -m pipelines.audit --cell {cell}"
        assert [out.def_path for out in audits[f"audit@{cell}"].outs] == [f"artifacts/audit/{cell}"]
    cells = [t.cell for t in params.grid_cells()]
    assert sorted(stages) == sorted(run_name(cell) for cell in cells)
    for cell in cells:
        stage = stages[run_name(cell)]
        assert stage.cmd == f"python -m pipelines.train --cell {cell}"
        assert [out.def_path for out in stage.outs] == [f"artifacts/train/{cell}"]


def test_train_help_lists_its_flags_and_a_misspelled_cell_is_refused(capsys, monkeypatch):
    from pipelines.train import main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as shown:
        main(["--help"])
    assert shown.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--resume", "--cell NAME", "--init", "--epsilon", "--model", "--data-fraction", "--seed", "-P"):
        assert flag in help_text
    with pytest.raises(SystemExit) as refused:
        main(["--cell", "scratch-8.0-atto-1-0"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "train: error: --cell scratch-8.0-atto-1-0 names the cell scratch-8-atto-1.0-0: write the cell name as the "
        "grid spells it (or drop the -P override of its knobs)"]
    with pytest.raises(SystemExit):
        main(["--cell", "scratch-8"])
    assert "is not <init>-<epsilon>-<model>-<fraction>-<seed>" in capsys.readouterr().err

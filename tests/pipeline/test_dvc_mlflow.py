"""The project as users drive it: the whole pipeline through `dvc repro` on a tiny configuration, `dvc push`/`dvc pull`
to the default remote, the DVC parameter dependencies, `mlflow run`."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROJECT_FILES = (".gitignore", "dvc.yaml", "params.yaml", "MLproject", ".dvcignore", ".dvc/config", ".dvc/.gitignore")


def run(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".gitignore"}


@pytest.fixture
def project(tmp_path: Path, tiny_data: Path) -> Path:
    """A fresh clone of the project's pipeline files with the tiny data set tracked by DVC."""
    root = tmp_path / "project"
    for name in PROJECT_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    for package in ("pipelines", "models"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_data, root / "data")
    params = yaml.safe_load((root / "params.yaml").read_text())
    tiny(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "init", "-q", cwd=root)
    run(str(BIN / "dvc"), "add", "-q", "data", cwd=root)
    return root


def test_repro_then_push_and_pull_round_trip(project):
    dvc = str(BIN / "dvc")
    run(dvc, "repro", cwd=project)
    assert (project / "artifacts/prepare/report.json").is_file()
    report = project / "artifacts/report"
    assert {"report.md", "report.html", "cross_site_heatmap.png", "auroc_vs_epsilon.png"} <= {
        p.name for p in report.iterdir()}
    cells = sorted(p.name for p in (project / "artifacts/train").iterdir() if p.is_dir())
    assert cells == ["domain_eps8_atto_f1.0_s0", "domain_epsinf_atto_f1.0_s0", "scratch_eps8_atto_f1.0_s0",
                     "scratch_epsinf_atto_f1.0_s0"]
    assert "up to date" in run(dvc, "status", cwd=project)
    # metrics.json is not cached (`cache: false`): git keeps it, as it would in a real clone.
    before = {**digest(project / "data"), **{f"artifacts/{k}": v for k, v in digest(project / "artifacts").items()
                                             if k != "metrics.json"}}
    assert "pushed" in run(dvc, "push", cwd=project)
    assert (project / ".dvc/storage").is_dir()           # the default remote lives inside the repository

    metrics = (project / "artifacts/metrics.json").read_bytes()
    for folder in (".dvc/cache", "data", "artifacts"):
        shutil.rmtree(project / folder)
    (project / "artifacts").mkdir()
    (project / "artifacts/metrics.json").write_bytes(metrics)   # git's, in a real clone
    run(dvc, "pull", cwd=project)
    after = {**digest(project / "data"), **{f"artifacts/{k}": v for k, v in digest(project / "artifacts").items()
                                            if k != "metrics.json"}}
    assert after == before
    assert "up to date" in run(dvc, "status", cwd=project)

    # A changed parameter makes exactly the stage that reads it stale.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["val_fraction"] = 0.1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert "prepare" in run(dvc, "status", cwd=project)
    params["prepare"]["val_fraction"] = 0.15
    # A new epsilon adds its cells and reruns what reads the grid, nothing else.
    params["grid"]["epsilons"] = [3, 8, "inf"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    status = run(dvc, "status", cwd=project).splitlines()
    stale = {line[:-1] for line in status if line.endswith(":") and not line.startswith(("\t", " "))}
    assert stale == {"train@scratch-3-atto-1.0-0", "train@domain-3-atto-1.0-0", "evaluate", "report", "register"}


def _registered_model_agrees_with_the_report(project: Path) -> None:
    """The champion alias names the ε = 8 model with the best val AUROC; its tags match evaluate and report."""
    import json

    import mlflow
    import pandas as pd

    from pipelines.registry import get_version

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    champion = get_version("dp-cxr-classifier", "champion")
    registered = json.loads((project / "artifacts/register/registered.json").read_text())
    assert champion.version in [r["version"] for r in registered if r["epsilon"] == 8]
    assert champion.tags["cell"].split("_")[1] == "eps8"
    results = pd.read_csv(project / "artifacts/evaluate/results.csv")
    row = results[(results["cell"] == champion.tags["cell"]) & (results["site"] == "synthetic-uka-cxr-inhouse")
                  & (results["metric"] == "auroc") & (results["label"] == "mean")].iloc[0]
    assert champion.tags["test_mean_auroc"] == f"{row['value']:.4f}"
    table = (project / "artifacts/report/results_table.md").read_text()
    assert f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" in table
    privacy = json.loads((project / "artifacts/train" / champion.tags["cell"] / "privacy.json").read_text())
    assert champion.tags["privacy.epsilon"] == f"{privacy['epsilon']:.4f}"
    assert get_version("dp-cxr-classifier", "non-private-baseline").tags["privacy.epsilon"] == "inf"


def test_mlflow_run_main_runs_the_study_as_one_parent_run(project):
    import mlflow

    run(str(BIN / "mlflow"), "run", ".", "--env-manager", "local", "--experiment-name", "study-test",
        "-P", "overrides=prepare.workers=1", cwd=project)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["study-test"], output_format="list")
    parent = next(r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "main")
    assert parent.info.status == "FINISHED" and parent.data.params["overrides"] == "prepare.workers=1"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"prepare", "validate", "pretrain", "evaluate", "report", "register"} <= children
    assert {f"train@{c}" for c in ("scratch_eps8_atto_f1_s0", "scratch_epsinf_atto_f1_s0", "domain_eps8_atto_f1_s0",
                                   "domain_epsinf_atto_f1_s0")} <= children
    domain = next(r for r in runs if r.info.run_name == "train@domain_eps8_atto_f1_s0")
    privacy = yaml.safe_load((project / "artifacts/train/domain_eps8_atto_f1_s0/privacy.json").read_text())
    assert privacy["init"]["strategy"] == "domain" and privacy["init"]["pretrain_run_id"]
    assert domain.data.tags["init_strategy"] == "domain"
    assert "grid.epsilons" in parent.data.params
    _registered_model_agrees_with_the_report(project)


def test_mlflow_run_entry_point(project):
    import mlflow

    run(str(BIN / "mlflow"), "run", ".", "-e", "prepare", "--env-manager", "local",
        "--experiment-name", "entry-point-test", "-P", "overrides=base.image_size=16 prepare.workers=1", cwd=project)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["entry-point-test"], output_format="list")
    assert len(runs) == 1
    logged = runs[0]
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["mlflow.project.entryPoint"] == "prepare"
    assert logged.data.tags["dp_cxr.stage"] == "prepare"
    assert logged.data.params["image_size"] == "16"
    assert logged.data.metrics["synthetic-uka-cxr-inhouse.images"] > 0
    # Aggregates only: no per-image identifiers or paths reach MLflow.
    assert not any("image_id" in key or "path" in key for key in {**logged.data.params, **logged.data.metrics})


def test_a_failing_gate_stops_dvc_repro(project):
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())["validate"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validate"] = defaults          # a few hundred images miss the default age-bin counts
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run([str(BIN / "dvc"), "repro"], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "age.bin_in_test_split" in result.stderr + result.stdout
    assert "validate: error:" in result.stderr + result.stdout
    # The results are there to read, but DVC has not recorded the stage as done.
    assert (project / "artifacts/validate/summary.json").is_file()
    assert "validate" in run(str(BIN / "dvc"), "status", cwd=project)

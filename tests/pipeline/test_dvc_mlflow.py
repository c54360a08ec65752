"""The project as users drive it, on the tiny study built once by `dvc repro`: its outputs and registry, `dvc push`
/`dvc pull` to the default remote, which stages a change makes stale, `mlflow run` of the same grid, a failing gate."""

import hashlib
import json

import mlflow
import pandas as pd
import pytest

from models.privacy import dp_accounting_epsilons
from models.registry import get_version
from pipelines.cells import run_name
from pipelines.config import load_params

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_project")]
PRIVATE = "synthetic-uka-cxr-inhouse"


def digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".gitignore"}


def grid_cells(project):
    return [t.cell for t in load_params(project.root / "params.yaml").grid_cells()]


def test_repro_builds_every_stage_and_names_each_cell_once(tiny_project):
    root = tiny_project.root
    assert (root / "artifacts/prepare/report.json").is_file()
    assert {p.name for p in (root / "artifacts/pretrain").iterdir()} == {"micro", "ssl-micro"}
    assert {"report.md", "report.html", "cross_site_heatmap.png", "auroc_vs_epsilon.png"} <= {
        p.name for p in (root / "artifacts/report").iterdir()}
    cells = grid_cells(tiny_project)
    assert sorted(p.name for p in (root / "artifacts/train").iterdir()) == sorted(cells)
    assert cells == ["domain-8-micro-0.5-0", "domain-8-micro-1.0-0", "domain-inf-micro-0.5-0", "domain-inf-micro-1.0-0"]
    audited = json.loads((root / "artifacts/audit/domain-8-micro-1.0-0/audit.json").read_text())
    assert audited["passed"] is True and audited["whitebox"]["m"] == 200 and audited["blackbox"]["m"] == 100
    assert max(audited[k][bound] for k in ("whitebox", "blackbox") for bound in ("epsilon_lower", "epsilon_lower_fdp")
               ) <= audited["epsilon_claimed"]
    assert "up to date" in tiny_project.dvc("status")


def test_the_report_shows_the_data_scale_sweep(tiny_project):
    folder = tiny_project.root / "artifacts/report"
    assert (folder / "data_fraction_sweep.png").is_file() and not (folder / "model_sweep.png").exists()
    sweep = pd.read_csv(folder / "data_fraction_sweep.csv", index_col=[0, 1])
    assert list(sweep.columns) == ["0.5", "1.0"] and len(sweep) == 2     # (init, epsilon) x fraction
    assert "Data scale" in (folder / "report.md").read_text()
    assert "δ = 1e-05" in (folder / "results_table.md").read_text()      # the configured delta, not a constant


def registered_model_agrees_with_the_report(project):
    """The champion alias names the ε = 8 model with the best val AUROC; its tags match evaluate and report."""
    mlflow.set_tracking_uri(project.tracking_uri)
    champion = get_version("dp-cxr-classifier", "champion")
    registered = json.loads((project.root / "artifacts/register/registered.json").read_text())
    assert champion.version in [r["version"] for r in registered if r["epsilon"] == 8]
    assert champion.tags["cell"].split("-")[1] == "8"
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"run_name = '{run_name(champion.tags['cell'])}'")
    assert champion.tags["train_run_id"] in {r.info.run_id for r in runs}
    results = pd.read_csv(project.root / "artifacts/evaluate/results.csv")
    row = results[(results["cell"] == champion.tags["cell"]) & (results["site"] == PRIVATE)
                  & (results["metric"] == "auroc") & (results["label"] == "mean")].iloc[0]
    assert champion.tags["test_mean_auroc"] == f"{row['value']:.4f}"
    # The headline table shows the cells trained on all the data.
    full = results[(results["cell"] == "domain-8-micro-1.0-0") & (results["site"] == PRIVATE)
                   & (results["metric"] == "auroc") & (results["label"] == "mean")].iloc[0]
    table = (project.root / "artifacts/report/results_table.md").read_text()
    assert f"{full['value']:.3f} [{full['ci_low']:.3f}, {full['ci_high']:.3f}]" in table
    # Best of the grid's two ε = 8 cells: the version is charged for both (PLD composition, rounded up).
    histories = [tuple(h) for cell in ("domain-8-micro-0.5-0", "domain-8-micro-1.0-0") for h in json.loads(
        (project.root / "artifacts/train" / cell / "privacy.json").read_text())["history"]]
    composed = dp_accounting_epsilons(histories, 1e-5)["pld"]
    assert composed <= float(champion.tags["privacy.epsilon"]) <= composed + 0.05
    privacy = json.loads((project.root / "artifacts/train" / champion.tags["cell"] / "privacy.json").read_text())
    assert float(champion.tags["privacy.epsilon_cell"]) >= privacy["epsilon"]
    assert champion.tags["privacy.selection"] == "best-of-grid" and champion.tags["privacy.noise_seed"] == "secret"
    assert get_version("dp-cxr-classifier", "non-private-baseline").tags["privacy.epsilon"] == "inf"
    # The audited configuration carries its measured lower bound next to the proven upper bound; others say so.
    audited = json.loads((project.root / "artifacts/audit/domain-8-micro-1.0-0/audit.json").read_text())
    for entry in registered:
        tags = mlflow.MlflowClient().get_model_version("dp-cxr-classifier", entry["version"]).tags
        if entry["cell"] == "domain-8-micro-1.0-0":
            for kind in ("whitebox", "blackbox"):
                assert float(tags[f"audit.epsilon_lower.{kind}"]) <= audited[kind]["epsilon_lower"] < float(
                    tags[f"audit.epsilon_lower.{kind}"]) + 1e-4
                assert f"m = {audited[kind]['m']}: epsilon >= {tags[f'audit.epsilon_lower.{kind}']} (one-run)" in tags[
                    "privacy.audit"]
            assert tags["privacy.audit"].startswith("audited at 95% confidence against a proven epsilon <=")
        else:
            assert "audit.epsilon_lower.whitebox" not in tags and tags["privacy.audit"].startswith("not audited")


def test_the_registered_model_agrees_with_the_report(tiny_project):
    registered_model_agrees_with_the_report(tiny_project)


def test_push_then_pull_restores_every_file(tiny_project, tmp_path):
    project = tiny_project.copy(tmp_path / "project")
    root = project.root
    # metrics.json is not cached (`cache: false`): git keeps it, as it would in a real clone.
    before = {**digest(root / "data"), **{f"artifacts/{k}": v for k, v in digest(root / "artifacts").items()
                                          if k != "metrics.json"}}
    assert "pushed" in project.dvc("push")
    assert (root / ".dvc/storage").is_dir()           # the default remote lives inside the repository
    metrics = (root / "artifacts/metrics.json").read_bytes()
    for folder in (".dvc/cache", "data", "artifacts"):
        (root / folder).rename(tmp_path / folder.replace("/", "-"))
    (root / "artifacts").mkdir()
    (root / "artifacts/metrics.json").write_bytes(metrics)   # git's, in a real clone
    project.dvc("pull")
    after = {**digest(root / "data"), **{f"artifacts/{k}": v for k, v in digest(root / "artifacts").items()
                                         if k != "metrics.json"}}
    assert after == before
    assert "up to date" in project.dvc("status")


def test_a_change_makes_exactly_the_stages_it_affects_stale(tiny_project, tmp_path):
    project = tiny_project.copy(tmp_path / "project")
    raw = project.params()
    raw["prepare"]["val_fraction"] = 0.1
    project.write_params(raw)
    assert "prepare" in project.stale()
    raw["prepare"]["val_fraction"] = 0.15
    # A new epsilon adds its cells and reruns what reads the grid, nothing else.
    raw["grid"]["epsilons"] = [3, 8, "inf"]
    project.write_params(raw)
    assert project.stale() == {"train@domain-3-micro-0.5-0", "train@domain-3-micro-1.0-0", "evaluate", "report",
                               "register"}
    raw["grid"]["epsilons"] = [8, "inf"]
    project.write_params(raw)
    assert project.stale() == set()
    # Editing a shared module reruns every stage that runs it (epoch selection, metrics), and no other.
    with (project.root / "pipelines/metrics.py").open("a") as module:
        module.write("\n# an edit\n")
    assert project.stale() == {"pretrain", "evaluate", "audit@domain-8-micro-1.0-0",
                               *(run_name(cell) for cell in grid_cells(project))}


def test_mlflow_run_main_of_the_same_grid_runs_the_study_and_evaluate_finds_each_cell_once(tiny_project, tmp_path):
    project = tiny_project.copy(tmp_path / "project")
    project.run("mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "study-test",
                "-P", "overrides=prepare.workers=1")
    mlflow.set_tracking_uri(project.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["study-test"], output_format="list")
    parent = next(r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "main")
    assert parent.info.status == "FINISHED" and parent.data.params["overrides"] == "prepare.workers=1"
    assert "grid.epsilons" in parent.data.params
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    cells = grid_cells(project)
    assert {"prepare", "validate", "pretrain", "evaluate", "report", "register"} <= children
    assert {run_name(cell) for cell in cells} | {"audit@domain-8-micro-1.0-0"} <= children
    domain = next(r for r in runs if r.info.run_name == "train@domain-8-micro-1.0-0")
    privacy = json.loads((project.root / "artifacts/train/domain-8-micro-1.0-0/privacy.json").read_text())
    assert privacy["init"]["strategy"] == "domain" and privacy["init"]["pretrain_run_id"]
    assert domain.data.tags["init_strategy"] == "domain" and domain.data.tags["dp_cxr.cell"] == "domain-8-micro-1.0-0"
    # Both ways of running wrote the same folders: one per cell, and evaluate used each once.
    assert sorted(p.name for p in (project.root / "artifacts/train").iterdir()) == sorted(cells)
    results = pd.read_csv(project.root / "artifacts/evaluate/results.csv")
    mean = results[(results["metric"] == "auroc") & (results["label"] == "mean")]
    assert sorted(mean.groupby("site")["cell"].apply(sorted).iloc[0]) == sorted(cells)
    assert not mean.duplicated(["cell", "site"]).any()
    registered_model_agrees_with_the_report(project)


def test_mlflow_run_entry_point(tiny_project, tmp_path):
    project = tiny_project.copy(tmp_path / "project")
    project.run("mlflow", "run", ".", "-e", "prepare", "--env-manager", "local", "--experiment-name",
                "entry-point-test", "-P", "overrides=base.image_size=16")
    mlflow.set_tracking_uri(project.tracking_uri)
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


def test_a_failing_gate_stops_dvc_repro(tiny_project, tmp_path):
    project = tiny_project.copy(tmp_path / "project")
    raw = project.params()
    raw["validate"]["min_test_age_bin_count"] = 5      # a few hundred images miss the default age-bin counts
    project.write_params(raw)
    result = project.run("dvc", "repro", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "age.bin_in_test_split" in output and "validate: error:" in output
    assert "Running stage 'prepare'" not in output                # prepare was cached
    # The results are there to read, but DVC has not recorded the stage as done.
    assert (project.root / "artifacts/validate/summary.json").is_file()
    assert "validate" in project.stale()


def test_a_cell_trains_in_two_processes_through_dvc_repro_and_mlflow_run(tiny_project, tmp_path):
    """train.processes: 2 launches the cell under torchrun: one privacy record and one MLflow run per cell, and the
    same sigma, q, steps and epsilon as the single-process run of the same cell."""
    project = tiny_project.copy(tmp_path / "project")
    cell = "domain-8-micro-1.0-0"
    record_file = project.root / "artifacts/train" / cell / "privacy.json"
    single = json.loads(record_file.read_text())
    raw = project.params()
    raw["train"]["processes"] = 2
    project.write_params(raw)
    assert f"train@{cell}" in project.stale()
    project.dvc("repro", "--single-item", f"train@{cell}")
    record = json.loads(record_file.read_text())
    assert (single["processes"], record["processes"]) == (1, 2)
    assert {k: record[k] for k in ("steps", "sample_rate", "noise_multiplier", "n", "epochs", "history")} == {
        k: single[k] for k in ("steps", "sample_rate", "noise_multiplier", "n", "epochs", "history")}
    assert record["epsilon"] == pytest.approx(single["epsilon"], rel=1e-12)

    mlflow.set_tracking_uri(project.tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`dp_cxr.cell` = '{cell}'",
                              output_format="list")
    assert sorted(r.data.tags["processes"] for r in runs) == ["1", "2"]            # the build's, then this one
    project.run("mlflow", "run", ".", "-e", "train", "--env-manager", "local", "--experiment-name", "two-processes",
                "-P", f"cell={cell}", "-P", "overrides=train.processes=2")
    [run] = mlflow.search_runs(experiment_names=["two-processes"], output_format="list")
    assert run.info.status == "FINISHED" and run.info.run_name == run_name(cell)
    assert run.data.tags["processes"] == "2" and run.data.tags["dp_cxr.cell"] == cell
    assert run.data.metrics["final_epsilon"] == pytest.approx(single["epsilon"], rel=1e-12)
    assert json.loads(record_file.read_text())["processes"] == 2

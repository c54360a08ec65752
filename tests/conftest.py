"""Shared fixtures: tool state in temp folders, a tiny synthetic data set generated once per session, and the tiny
project built once by `dvc repro` and shared by every test that only reads it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
from pipelines.data.synthetic.cohort import SITES  # noqa: E402

PRIVATE = next(site for site in SITES if site.role == "private")
PROJECT_FILES = (".gitignore", "dvc.yaml", "params.yaml", "MLproject", ".dvcignore", ".dvc/config", ".dvc/.gitignore")
PACKAGES = ("pipelines", "models", "serving")


def tiny(params: dict) -> None:
    """Edits raw params.yaml content to the study at a tiny scale: a few hundred 32 px images, the 0.23M-parameter
    ``micro`` ConvNeXt, one epoch per model, both pretraining methods (supervised and self-supervised), the domain
    init (pretraining, registry, overlap check) at epsilon 8 and inf on half and all the data (a data-scale sweep,
    two candidates per epsilon for the registry's choice), an audit of one cell with 200 gradient and 100 input canaries, 50 resamples."""
    # A few hundred images cannot meet the default subgroup thresholds: relax those the tiny set misses.
    params["validate"].update(min_test_age_bin_count=0, min_prevalence=0.0, max_prevalence=1.0)
    params["base"]["image_size"] = 32
    params["prepare"]["workers"] = 1
    params["pretrain"].update(methods=["supervised", "ssl"], models=["micro"], epochs=1, batch=32)
    params["pretrain"]["ssl"].update(epochs=1, batch=32)
    params["train"].update(model="micro", epochs=1, logical_batch=32, physical_batch=32, self_check_images=2)
    params["grid"].update(inits=["domain"], epsilons=[8, "inf"], models=["micro"], data_fractions=[0.5, 1.0])
    params["evaluate"].update(resamples=50, min_subgroup_positives=3)
    params["audit"].update(cells=["domain-8-micro-1.0-0"], canaries=200, input_canaries=100)
    params["register"].update(aliases={"champion": 8, "non-private-baseline": "inf"}, private_aliases=["champion"])


@dataclass(frozen=True)
class Project:
    """A clone of the project's pipeline files with the tiny data set tracked by DVC and its own MLflow store."""

    root: Path

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def env(self) -> dict[str, str]:
        # Not the experiment or registry an in-process stage of this test worker picked (MLflow exports both).
        inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_REGISTRY_URI")}
        return {**inherited, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": self.tracking_uri}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Runs a command in the project (``dvc``, ``mlflow`` and ``python`` are this environment's)."""
        result = subprocess.run(args, cwd=self.root, env=self.env(), capture_output=True, text=True)
        if check:
            assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def dvc(self, *args: str) -> str:
        result = self.run("dvc", *args)
        return result.stdout + result.stderr

    def stale(self) -> set[str]:
        """The stages `dvc status` reports as changed."""
        return {line[:-1] for line in self.dvc("status").splitlines()
                if line.endswith(":") and not line.startswith(("\t", " "))}

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, raw: dict) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def copy(self, to: Path) -> Project:
        """An independent copy (files, DVC cache, MLflow store), e.g. for a test that changes the project."""
        shutil.copytree(self.root, to, symlinks=True)
        copied = Project(to)
        # The experiments' artifact locations are absolute: point them at the copy's own folder.
        import sqlite3

        with sqlite3.connect(to / "mlflow.db") as db:
            db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                       (str(self.root), str(to)))
        return copied


def make_project(root: Path, data: Path) -> Project:
    """Copies the pipeline files, the packages and the tiny data set into ``root`` and tracks the data with DVC."""
    for name in PROJECT_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(data, root / "data")
    project = Project(root)
    raw = project.params()
    tiny(raw)
    project.write_params(raw)
    project.run("git", "init", "-q")
    project.dvc("add", "-q", "data")
    return project


def pytest_collection_finish(session: pytest.Session) -> None:
    """Stops at once when xdist's ``--dist loadgroup`` no longer keeps a group on one worker (its node-id suffix
    is gone, as with pytest 9): the tests sharing the tiny project would wait on each other's build."""
    if getattr(session.config.option, "loadgroup", False):
        scattered = [item.nodeid for item in session.items
                     if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if scattered:
            raise pytest.UsageError(f"--dist loadgroup did not group {scattered[0]}: use pytest < 9 (pyproject.toml)")


@pytest.fixture(autouse=True, scope="session")
def _isolated_tool_state(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Points MLflow, DVC, BentoML and Great Expectations at a temp folder, so tests leave nothing behind.

    Under xdist each worker (and what it starts) computes on one thread: two workers of two threads each on two
    cores would oversubscribe them, and torch slows down several times over.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    state = tmp_path_factory.mktemp("tool-state")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{state / 'mlflow.db'}"
    os.environ["DVC_SITE_CACHE_DIR"] = str(state / "dvc-site-cache")
    os.environ["DVC_NO_ANALYTICS"] = "1"
    os.environ["BENTOML_HOME"] = str(state / "bentoml")
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    os.environ["MPLCONFIGDIR"] = str(state / "matplotlib")
    # MLflow Projects and GX leave tmp* folders behind: keep them in this session's temp folder.
    os.environ["TMPDIR"] = str(state)
    os.environ.pop("MLFLOW_RUN_ID", None)


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` run once per test run, whatever the number of xdist workers; returns the folder.

    The first worker to ask builds under a file lock; the others wait for it and share the result (read only).
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root, built = shared / name, shared / f"{name}.built"
    with FileLock(str(shared / f"{name}.lock")):
        if not built.exists():
            shutil.rmtree(root, ignore_errors=True)
            build(root)
            built.touch()
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic multi-site data set at a tiny scale (a few hundred images), generated once."""
    from pipelines.data.synthetic.generate import generate

    return build_once(tmp_path_factory, "tiny-data", lambda root: generate(root, seed=7, scale=0.06, workers=2))


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Project:
    """The tiny study built once per test run by `dvc repro` (every stage, the grid, the registry), shared by the
    xdist workers. Read it; never change it: a test that changes the project works on ``tiny_project.copy(...)``."""
    return Project(build_once(tmp_path_factory, "tiny-project",
                              lambda root: make_project(root, tiny_data).dvc("repro")))


@pytest.fixture(scope="session")
def private_store(tmp_path_factory):
    """The private site alone at a small scale, prepared at 32 px (built once; train and audit tests copy it)."""
    from pipelines.config import load_params
    from pipelines.data.synthetic.generate import generate
    from pipelines.prepare import prepare

    def build(root):
        generate(root / "data", seed=11, scale=0.25, workers=2, sites=(PRIVATE,))
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["data"]["sites"] = {PRIVATE.name: raw["data"]["sites"][PRIVATE.name]}
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        cwd = Path.cwd()
        try:
            os.chdir(root)
            prepare(load_params(Path("params.yaml"), ["base.image_size=32"]))
        finally:
            os.chdir(cwd)

    return build_once(tmp_path_factory, "private-store", build)


@pytest.fixture
def private_workspace(private_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding a copy of the prepared private site and its params.yaml."""
    shutil.copytree(private_store / "artifacts", tmp_path / "artifacts")
    shutil.copy(private_store / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def workspace(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with params.yaml and a copy of the tiny data set, as a stage sees the repo root."""
    shutil.copytree(tiny_data, tmp_path / "data")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path

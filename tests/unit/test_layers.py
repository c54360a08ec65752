"""The code's structure, checked from its source: DVC dependencies equal what each stage imports, and layers
point one way (models/ and serving/ never import pipelines/; stages share code through the modules that own it,
never through each other)."""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipelines", "models", "serving")
STAGES = ("prepare", "validate", "pretrain", "train", "audit", "evaluate", "report", "register")
# Code a stage ships without importing it: register logs the models-from-code file as the model's code.
SHIPPED = {"register": {Path("models/pyfunc.py")}}


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The project file of a dotted module name, or None for a third-party or missing module."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = root.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(file: Path, root: Path = REPO) -> set[str]:
    """Every project module ``file`` imports, at the top or inside functions (lazy imports run too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from pipelines.data import source` imports the module pipelines.data.source
            names |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}", root)}
    return {name for name in names if module_file(name, root)}


def has_code(init: Path) -> bool:
    """Whether a package's ``__init__.py`` does more than carry a docstring."""
    body = ast.parse(init.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def closure(module: str, root: Path = REPO) -> set[Path]:
    """The project files that running ``python -m <module>`` executes (package inits that hold code included)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        files = [module_file(".".join(parts[:k]), root) for k in range(1, len(parts))]
        files = [f for f in files if f is not None and f.name == "__init__.py" and has_code(f)]
        for file in [module_file(name, root), *files]:
            if file is not None and file not in seen:
                seen.add(file)
                todo += sorted(imported_modules(file, root))
    return {file.relative_to(root) for file in seen}


def code_deps(stage: dict) -> set[str]:
    return {dep for dep in stage.get("deps", []) if dep.split("/")[0] in PACKAGES}


def covered(file: Path, deps: set[str]) -> bool:
    return any(file == Path(dep) or Path(dep) in file.parents for dep in deps)


def listed_files(dep: str, root: Path = REPO) -> set[Path]:
    """The Python files a dep names: the file, or every file under the folder."""
    path = root / dep
    files = path.rglob("*.py") if path.is_dir() else [path]
    return {file.relative_to(root) for file in files if "__pycache__" not in file.parts}


def stage_problems(dvc_yaml: dict, root: Path = REPO) -> list[str]:
    """What is wrong with each stage's code deps: a module it runs not listed, or a listed one it never runs
    (which would rerun the stage for nothing)."""
    problems = []
    for name, stage in dvc_yaml["stages"].items():
        stage = stage.get("do", stage)          # a foreach stage's body
        module = stage["cmd"].split("python -m ")[1].split()[0]
        needed, deps = closure(module, root) | SHIPPED.get(name, set()), code_deps(stage)
        for file in sorted(needed):
            if not covered(file, deps):
                problems.append(f"{name}: runs {file} but dvc.yaml does not list it")
        for dep in sorted(deps):
            for file in sorted(listed_files(dep, root) - needed):
                if file.name != "__init__.py" or has_code(root / file):
                    problems.append(f"{name}: lists {file} (in {dep}), which it never runs")
    return problems


def test_every_stage_depends_on_exactly_the_code_it_runs():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert set(dvc_yaml["stages"]) == set(STAGES)
    assert stage_problems(dvc_yaml) == []


def test_a_missing_dependency_is_caught():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc_yaml["stages"]["train"]["deps"].remove("pipelines/metrics.py")
    assert stage_problems(dvc_yaml) == ["train: runs pipelines/metrics.py but dvc.yaml does not list it"]


def test_a_needless_dependency_is_caught():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc_yaml["stages"]["validate"]["deps"].append("models/per_sample.py")
    assert stage_problems(dvc_yaml) == ["validate: lists models/per_sample.py (in models/per_sample.py), which it "
                                        "never runs"]


def test_the_closure_follows_lazy_and_from_package_imports(tmp_path):
    (tmp_path / "pipelines" / "data").mkdir(parents=True)
    (tmp_path / "pipelines" / "__init__.py").write_text('"""Docstring only."""\n')
    (tmp_path / "pipelines" / "data" / "__init__.py").write_text("X = 1\n")
    (tmp_path / "pipelines" / "stage.py").write_text(
        "def f():\n    from pipelines.data import helper\n    import numpy\n")
    (tmp_path / "pipelines" / "data" / "helper.py").write_text("import pipelines.other\n")
    (tmp_path / "pipelines" / "other.py").write_text("")
    assert closure("pipelines.stage", tmp_path) == {
        Path("pipelines/stage.py"), Path("pipelines/data/__init__.py"), Path("pipelines/data/helper.py"),
        Path("pipelines/other.py")}


@pytest.mark.parametrize("package", ["models", "serving"])
def test_models_and_serving_never_import_the_pipeline(package):
    offenders = {str(file.relative_to(REPO)): sorted(n for n in imported_modules(file) if n.startswith("pipelines"))
                 for file in (REPO / package).rglob("*.py")}
    assert {file: names for file, names in offenders.items() if names} == {}


def test_stages_never_import_each_other():
    """Stages share code through the modules that own it; only the study (MLproject main) runs them all."""
    stage_modules = {f"pipelines.{stage}" for stage in STAGES}
    offenders = {stage: sorted(imported_modules(REPO / "pipelines" / f"{stage}.py") & stage_modules)
                 for stage in STAGES}
    assert {stage: names for stage, names in offenders.items() if names} == {}


def test_the_serving_bento_needs_no_data_layer():
    """What `bentoml serve` imports stays inside models/ and serving/ (no pandas-heavy data layer in the bento)."""
    assert {str(f).split("/")[0] for f in closure("serving.service")} <= {"models", "serving"}

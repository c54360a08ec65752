"""The whole study as one MLflow run (the MLproject ``main`` entry point).

Runs prepare -> validate -> pretrain -> train (every grid cell) -> audit (audit.cells) -> evaluate -> report ->
register in this process, each stage (and each grid cell) as a child run of one parent run, with the same stage
functions DVC runs. It is the MLflow way to run the study end to end; ``dvc repro`` is the DVC way (with
caching of unchanged stages).

    mlflow run . --env-manager local [-P overrides="grid.epsilons=[1,8,inf] train.epochs=4"]
"""

from __future__ import annotations

import sys
import time

from pipelines.audit import audit
from pipelines.config import Params
from pipelines.evaluate import evaluate
from pipelines.prepare import prepare
from pipelines.pretrain import pretrain
from pipelines.register import register_models
from pipelines.report import report
from pipelines.stage import run_stage
from pipelines.tracking import stage_run
from pipelines.train import train
from pipelines.validate import validate

STAGE = "main"


def study(params: Params) -> list[dict[str, object]]:
    """Runs every stage of the study under one parent MLflow run.

    Returns:
        The registered versions.
    """
    import mlflow

    started = time.perf_counter()
    with stage_run(STAGE):
        mlflow.log_params({"grid.inits": params.grid.inits, "grid.epsilons": params.grid.epsilons,
                           "grid.models": params.grid.models, "grid.data_fractions": params.grid.data_fractions,
                           "grid.seeds": params.grid.seeds})
        prepare(params)
        validate(params)
        pretrain(params)
        cells = params.grid_cells()
        for number, cell in enumerate(cells, 1):
            print(f"main: grid cell {number}/{len(cells)}: init={cell.init} epsilon={cell.epsilon:g} "
                  f"model={cell.model} data_fraction={cell.data_fraction:g} seed={cell.seed}", file=sys.stderr)
            train(params.for_cell(cell))
        for cell in cells:
            if cell.cell in params.audit.cells:
                audit(params.for_cell(cell))
        evaluate(params)
        report(params)
        registered = register_models(params)
        mlflow.log_metric("study_minutes", (time.perf_counter() - started) / 60)
    return registered


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.study [--overrides "grid.epsilons=[1,8,inf]"]``."""
    run_stage(STAGE, study, argv)


if __name__ == "__main__":
    main()

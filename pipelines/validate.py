"""The validate stage: a Great Expectations gate on every site's prepared demographic metadata.

Nothing trains on data that fails it. For each site the stage builds a suite (schema, sex, age, identifiers,
labels, subgroup representation; for the private site also per-split label coverage, patient-level split
integrity and no image content shared with the public pretraining source), runs it on the prepared
``metadata.csv`` and writes under ``<artifacts>/validate/``: ``summary.json`` (machine-readable),
``results.json`` (Great Expectations' own results) and Data Docs HTML. Results hold counts and rates only:
GX is asked for no unexpected values, so no patient identifier or demographic value is ever stored.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.atomic import atomic_folder
from pipelines.config import Params
from pipelines.data.schema import AGE_BIN_NAMES, AGE_BINS, LABELS, MAX_PLAUSIBLE_AGE, age_bin
from pipelines.data.store import ID_COLUMNS, METADATA
from pipelines.offline_docs import AssetsUnavailable, vendor
from pipelines.stage import StageError, run_stage
from pipelines.tracking import stage_run

STAGE = "validate"
REQUIRED_COLUMNS = ("image_id", "patient_id", "study_id", "site", "view", "sex", "age", "split", "content_hash",
                    *LABELS)
SPLITS = ("train", "val", "test")
# Counts and rates only: never a list of offending values, rows or indices.
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 0, "include_unexpected_rows": False}
BIN_COLUMNS = [f"age_bin_{lo}_{hi}" for lo, hi in AGE_BINS]


@dataclass(frozen=True)
class Failure:
    """One failed expectation, as the terminal table and summary.json show it."""

    site: str
    check: str
    column: str
    count: str


def validate(params: Params, data_docs: bool = True) -> dict[str, object]:
    """Runs the gate on every site and logs it to MLflow.

    Args:
        params: the resolved configuration.
        data_docs: render the Great Expectations Data Docs (the slow part; tests of single checks skip it).

    Returns:
        The summary written to ``summary.json``.

    Raises:
        StageError: an expectation failed (after the results are written).
    """
    prepared = Path(params.base.artifacts) / "prepare"
    frames = {name: _read(prepared / name / METADATA) for name in params.data.sites}
    dropped = _dropped_fractions(prepared / "report.json")
    public_hashes = set().union(*[set(frames[n]["content_hash"].dropna()) for n, s in params.data.sites.items()
                                  if s.role == "public" and "content_hash" in frames[n]])
    out = Path(params.base.artifacts) / STAGE
    with atomic_folder(out) as partial:
        summary, gx_results = _run_suites(params, frames, public_hashes, dropped,
                                          partial / "data_docs" if data_docs else None)
        if data_docs:
            _offline(partial / "data_docs")
        (partial / "summary.json").write_text(json.dumps(summary, indent=2))
        (partial / "results.json").write_text(json.dumps(gx_results, indent=2, default=str))
    _print_table(summary)
    _log(summary, out)
    if not summary["success"]:
        raise StageError(f"{summary['failed']} expectation(s) failed; nothing may train on this data. "
                         f"Details: {out / 'summary.json'} and {out / 'data_docs' / 'index.html'}")
    return summary


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the prepare stage first (`dvc repro prepare`)")
    header = pd.read_csv(path, nrows=0).columns
    return pd.read_csv(path, dtype={c: "string" for c in ID_COLUMNS if c in header})


def _dropped_fractions(report: Path) -> dict[str, float]:
    """Per site, the share of its frontal rows that prepare dropped as non-assessable, unlabelled or unreadable."""
    if not report.is_file():
        return {}
    sites = json.loads(report.read_text())["sites"]
    return {name: sum(v for k, v in site.get("dropped", {}).items() if k != "non_frontal") / max(site["frontal"], 1)
            for name, site in sites.items() if "dropped" in site}


def derive(frame: pd.DataFrame, private: bool, public_hashes: set[str],
           dropped_fraction: float | None = None) -> pd.DataFrame:
    """Adds the columns the suite checks that are not in the metadata itself.

    Args:
        frame: a site's metadata.
        private: whether this is the private site (split integrity and overlap columns).
        public_hashes: content hashes of the public pretraining source.
        dropped_fraction: the share of the site's frontal rows prepare dropped (its report), if known.

    Returns:
        A copy with ``is_female`` (1/0, null unless F or M), one 0/1 column per age bin, for the private site
        ``splits_per_patient`` and ``in_public_source``, and ``prepare_dropped_fraction`` (the same on every row).
    """
    out = frame.copy()
    if dropped_fraction is not None:
        out["prepare_dropped_fraction"] = dropped_fraction
    if "sex" in out:
        out["is_female"] = out["sex"].map({"F": 1.0, "M": 0.0}).astype("float64")
    if "age" in out:
        ages = pd.to_numeric(out["age"], errors="coerce")
        bins = age_bin(ages.where((ages >= 0) & (ages <= MAX_PLAUSIBLE_AGE)))
        for column, label in zip(BIN_COLUMNS, AGE_BIN_NAMES, strict=True):
            out[column] = (bins == label).astype("int64")
    if private and {"patient_id", "split"} <= set(out.columns):
        out["splits_per_patient"] = out.groupby("patient_id", dropna=False)["split"].transform("nunique")
    if private and "content_hash" in out:
        out["in_public_source"] = out["content_hash"].isin(public_hashes)
    return out


def build_suite(site: str, frame: pd.DataFrame, private: bool, params: Params) -> list[object]:
    """The expectations for one site, each tagged with a check name in ``meta``.

    Expectations on a column that is missing are left out (the schema check already fails for it).
    """
    import great_expectations.expectations as gxe

    v = params.validate
    present = set(frame.columns)
    items: list[object] = []

    def add(check: str, expectation_class: type, **kwargs: object) -> None:
        column = kwargs.get("column")
        if column is None or column in present or expectation_class is gxe.ExpectColumnToExist:
            meta = {"check": check, "site": site, "where": kwargs.get("row_condition", "")}
            items.append(expectation_class(**kwargs, meta=meta))

    for column in REQUIRED_COLUMNS:
        add("schema.column_exists", gxe.ExpectColumnToExist, column=column)
    add("schema.age_type", gxe.ExpectColumnValuesToBeInTypeList, column="age",
        type_list=["float64", "float32", "int64", "int32", "Float64", "Int64"])
    for label in LABELS:
        add("schema.label_type", gxe.ExpectColumnValuesToBeInTypeList, column=label,
            type_list=["int64", "int32", "int8", "Int64", "Int8"])
    add("sex.values", gxe.ExpectColumnValuesToBeInSet, column="sex", value_set=["F", "M"])
    add("sex.nulls", gxe.ExpectColumnProportionOfNonNullValuesToBeBetween, column="sex",
        min_value=1 - v.max_sex_null_fraction, max_value=1)
    add("sex.share", gxe.ExpectColumnMeanToBeBetween, column="is_female", min_value=v.min_sex_share,
        max_value=1 - v.min_sex_share)
    add("age.range", gxe.ExpectColumnValuesToBeBetween, column="age", min_value=v.min_age, max_value=v.max_age)
    add("age.nulls", gxe.ExpectColumnProportionOfNonNullValuesToBeBetween, column="age",
        min_value=1 - v.max_age_null_fraction, max_value=1)
    for column in BIN_COLUMNS:
        add("age.bin_in_test_split", gxe.ExpectColumnSumToBeBetween, column=column,
            min_value=v.min_test_age_bin_count, row_condition='split=="test"', condition_parser="pandas")
    for column in ("patient_id", "image_id"):
        add("ids.not_null", gxe.ExpectColumnValuesToNotBeNull, column=column)
    add("ids.image_unique", gxe.ExpectColumnValuesToBeUnique, column="image_id")
    add("rows.dropped_share", gxe.ExpectColumnMaxToBeBetween, column="prepare_dropped_fraction",
        max_value=v.max_dropped_fraction)
    if {"patient_id", "image_id"} <= present:
        add("ids.patient_image_unique", gxe.ExpectCompoundColumnsToBeUnique, column_list=["patient_id", "image_id"])
    for label in LABELS:
        add("labels.binary", gxe.ExpectColumnValuesToBeInSet, column=label, value_set=[0, 1])
        add("labels.not_null", gxe.ExpectColumnValuesToNotBeNull, column=label)
        add("labels.prevalence", gxe.ExpectColumnMeanToBeBetween, column=label, min_value=v.min_prevalence,
            max_value=v.max_prevalence)
    if private:
        add("splits.values", gxe.ExpectColumnValuesToBeInSet, column="split", value_set=list(SPLITS))
        for split in SPLITS:
            for label in LABELS:
                # AUROC needs both classes in every split: the mean lies strictly between 0 and 1.
                add(f"splits.{split}_has_both_classes", gxe.ExpectColumnMeanToBeBetween, column=label,
                    min_value=0, max_value=1, strict_min=True, strict_max=True,
                    row_condition=f'split=="{split}"', condition_parser="pandas")
        add("splits.patient_in_one_split", gxe.ExpectColumnValuesToBeBetween, column="splits_per_patient",
            max_value=1)
        add("privacy.no_public_overlap", gxe.ExpectColumnValuesToBeInSet, column="in_public_source",
            value_set=[False])
    return items


def _run_suites(params: Params, frames: dict[str, pd.DataFrame], public_hashes: set[str],
                dropped: dict[str, float], docs: Path | None) -> tuple[dict[str, object], dict[str, object]]:
    with _gx_temp_folder():
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        actions = []
        if docs is not None:
            context.add_data_docs_site(site_name="dp_cxr_validate", site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs.resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
            actions.append(gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["dp_cxr_validate"]))
        source = context.data_sources.add_pandas(name="prepared")
        failures: list[Failure] = []
        sites: dict[str, object] = {}
        gx_results: dict[str, object] = {}
        for name, frame in frames.items():
            private = params.data.sites[name].role == "private"
            data = derive(frame, private, public_hashes, dropped.get(name))
            suite = context.suites.add(gx.ExpectationSuite(name=f"{name}.demographics",
                                                           expectations=build_suite(name, data, private, params)))
            batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=f"{name}.gate", data=batch, suite=suite))
            checkpoint = context.checkpoints.add(gx.Checkpoint(
                name=f"{name}.checkpoint", validation_definitions=[definition], result_format=RESULT_FORMAT,
                actions=actions))
            result = next(iter(checkpoint.run(batch_parameters={"dataframe": data}).run_results.values()))
            gx_results[name] = result.to_json_dict()
            site_failures = [_failure(name, r) for r in result.results if not r.success]
            failures.extend(site_failures)
            sites[name] = {"rows": len(frame), "evaluated": len(result.results),
                           "failed": len(site_failures), "success": not site_failures}
    summary = {"success": not failures, "evaluated": sum(s["evaluated"] for s in sites.values()),
               "failed": len(failures), "sites": sites, "failures": [f.__dict__ for f in failures]}
    return summary, gx_results


def _failure(site: str, result: object) -> Failure:
    config = result.expectation_config
    kwargs = config.kwargs
    column = kwargs.get("column") or ",".join(kwargs.get("column_list", []))
    outcome = result.result or {}
    if result.exception_info and result.exception_info.get("raised_exception"):
        count = "error: " + str(result.exception_info.get("exception_message", ""))[:80]
    elif "unexpected_count" in outcome:
        count = f"{outcome['unexpected_count']} of {outcome.get('element_count', '?')} rows"
    elif "observed_value" in outcome:
        count = f"observed {_round(outcome['observed_value'])}"
    else:
        count = "column missing" if config.type == "expect_column_to_exist" else "failed"
    if config.meta.get("where"):
        count += f" where {config.meta['where']}"
    return Failure(site, config.meta.get("check", config.type), column, count)


def _round(value: object) -> object:
    return round(float(value), 4) if isinstance(value, (float, np.floating)) else value


def _offline(site: Path) -> None:
    """Makes the Data Docs load their scripts and styles from copies beside them (``pipelines.offline_docs``)."""
    try:
        vendor(site)
    except AssetsUnavailable as error:
        # The gate's verdict does not depend on the pages: keep them, and say they need the internet.
        print(f"validate: warning: the Data Docs still load their scripts from public CDNs and show nothing "
              f"offline: {error} (run `make setup` where the npm registry is reachable)", file=sys.stderr)


def _print_table(summary: dict[str, object]) -> None:
    status = "passed" if summary["success"] else f"FAILED ({summary['failed']} of {summary['evaluated']})"
    print(f"validate: {summary['evaluated']} expectations over {len(summary['sites'])} sites: {status}",
          file=sys.stderr)
    if summary["failures"]:
        rows = [("site", "check", "column", "count")] + [
            (f["site"], f["check"], f["column"], f["count"]) for f in summary["failures"]]
        widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
        for r in rows:
            print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)), file=sys.stderr)


@contextmanager
def _gx_temp_folder() -> Iterator[None]:
    """Great Expectations' ephemeral context leaves tmp* folders behind: give it one we remove afterwards."""
    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="dp-cxr-gx-") as folder:
        tempfile.tempdir = folder
        try:
            yield
        finally:
            tempfile.tempdir = previous


def _log(summary: dict[str, object], out: Path) -> None:
    import mlflow

    with stage_run(STAGE):
        mlflow.set_tag("validation", "passed" if summary["success"] else "failed")
        mlflow.log_metrics({"expectations_evaluated": summary["evaluated"], "expectations_failed": summary["failed"]})
        mlflow.log_artifact(str(out / "summary.json"))
        if (out / "data_docs").is_dir():
            mlflow.log_artifacts(str(out / "data_docs"), artifact_path="data_docs")


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.validate [--params params.yaml] [-P key=value ...]``."""
    run_stage(STAGE, validate, argv)


if __name__ == "__main__":
    main()

"""The prepare stage: native data sets -> harmonised metadata + a preprocessed uint8 image store per site.

For every configured site: read the native files with its adapter, keep frontal views, drop the rows nobody
assessed (an adapter's exclusions such as PadChest's non-assessable images, and rows without a single label,
which the label policy would otherwise turn into rows of negatives), apply the label policy, assign splits
(patient-level for the private site; the data set's own for the public source; everything ``test`` for external
sites), then decode and preprocess every image on all workers into ``<artifacts>/prepare/<site>/images.npy``
with ``metadata.csv`` and ``signatures.npy`` (each image's near-duplicate signature, for the overlap check
between the pretraining source and the private site). Unreadable images are skipped and listed in
``report.json``; too many of them fail the stage. ``report.json`` counts, per site, the rows dropped and why
(``dropped``: ``non_frontal``, ``non_assessable``, ``unlabelled``, ``unreadable``), the kept rows whose labels the
policy filled (``labels_filled``: ``not_mentioned``, ``uncertain``) and the kept rows missing sex or age
(``missing``; the validate gate bounds their share). Outputs appear only when every site is done.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from models.preprocessing import ImageDecodeError, decode_file, preprocess
from pipelines.atomic import atomic_folder
from pipelines.config import Params, Site
from pipelines.data.adapters import read_manifest
from pipelines.data.schema import EXCLUSIONS, FRONTAL_VIEWS, LABELS, apply_label_policy
from pipelines.data.source import SIGNATURE_SIZE, signature
from pipelines.data.splits import patient_splits
from pipelines.data.store import IMAGES, METADATA, SIGNATURES
from pipelines.stage import StageError, run_stage
from pipelines.tracking import stage_run

STAGE = "prepare"


def prepare(params: Params) -> dict[str, object]:
    """Runs the stage and logs it to MLflow.

    Args:
        params: the resolved configuration.

    Returns:
        The report written to ``report.json``.

    Raises:
        StageError: a site has more unreadable images than ``prepare.max_bad_fraction``.
    """
    out = Path(params.base.artifacts) / STAGE
    started = time.perf_counter()
    report: dict[str, object] = {"image_size": params.base.image_size, "sites": {}}
    with atomic_folder(out) as partial:
        # Read every site's metadata before decoding any image, so a wrong path or file fails at once.
        manifests = {name: _harmonise(name, site, params) for name, site in params.data.sites.items()}
        with _workers(params.prepare.workers) as pool:
            for name, (manifest, counts) in manifests.items():
                site = params.data.sites[name]
                stored = _write_store(name, manifest, params, partial / name, pool)
                counts["dropped"]["unreadable"] = stored["bad"]
                report["sites"][name] = {"role": site.role, "format": site.format, **counts, **stored}
        total = sum(s["images"] for s in report["sites"].values())
        elapsed = time.perf_counter() - started
        report["images"] = total
        # The stored report is a deterministic DVC output: timings go to the terminal and MLflow only.
        (partial / "report.json").write_text(json.dumps(report, indent=2))
        report["seconds"], report["images_per_second"] = round(elapsed, 2), round(total / elapsed, 1)
    print(f"prepare: {report['images']} images in {report['seconds']} s ({report['images_per_second']} images/s) "
          f"-> {out}", file=sys.stderr)
    _log(params, report)
    return report


def _harmonise(name: str, site: Site, params: Params) -> tuple[pd.DataFrame, dict[str, object]]:
    """The site's manifest with its unusable rows dropped, the label policy and splits applied, and its counts."""
    manifest = read_manifest(site.format, Path(site.path), name, **site.options)
    listed = len(manifest)
    dropped: dict[str, int] = {}

    def drop(reason: str, rows: pd.Series) -> pd.DataFrame:
        dropped[reason] = int(rows.sum())
        return manifest[~rows.to_numpy()].reset_index(drop=True)

    if params.data.frontal_only:
        manifest = drop("non_frontal", ~manifest["view"].isin(FRONTAL_VIEWS))
    frontal = len(manifest)
    for reason in sorted(EXCLUSIONS):
        manifest = drop(reason.replace("-", "_"), manifest["excluded"].eq(reason).fillna(False).astype(bool))
    manifest = drop("unlabelled", manifest[list(LABELS)].isna().all(axis=1))
    labels = manifest[list(LABELS)]
    counts = {"listed": listed, "frontal": frontal, "dropped": dropped,
              "labels_filled": {"not_mentioned": int(labels.isna().any(axis=1).sum()),
                                "uncertain": int(labels.eq(-1).any(axis=1).sum())}}
    manifest = apply_label_policy(manifest, params.data.uncertain, params.data.not_mentioned).drop(columns="excluded")
    manifest["source_split"] = manifest["split"]
    manifest["split"] = _splits(manifest, site, params)
    return manifest, counts


def _write_store(name: str, manifest: pd.DataFrame, params: Params, folder: Path,
                 pool: multiprocessing.pool.Pool | None) -> dict[str, object]:
    """Decodes and preprocesses the site's images into its store; returns the site's part of the report."""
    folder.mkdir(parents=True)
    size = params.base.image_size
    staging = np.lib.format.open_memmap(folder / f".{IMAGES}", mode="w+", dtype=np.uint8,
                                        shape=(len(manifest), size, size))
    staged_signatures = np.lib.format.open_memmap(folder / f".{SIGNATURES}", mode="w+", dtype=np.uint8,
                                                  shape=(len(manifest), SIGNATURE_SIZE ** 2))
    kept: list[int] = []
    hashes: list[str] = []
    bad: list[dict[str, str]] = []
    tasks = [(path, size) for path in manifest["path"]]
    results = pool.imap(_load, tasks, chunksize=32) if pool else map(_load, tasks)
    progress = tqdm(results, total=len(tasks), desc=f"prepare {name}", unit="img", file=sys.stderr,
                    mininterval=1.0)
    for row, (pixels, near, error) in enumerate(progress):
        if error is not None:
            bad.append({"image_id": manifest.at[row, "image_id"], "path": manifest.at[row, "path"], "reason": error})
            continue
        staging[len(kept)] = pixels
        staged_signatures[len(kept)] = near
        kept.append(row)
        hashes.append(hashlib.sha256(pixels.tobytes()).hexdigest())
    bad_fraction = len(bad) / max(len(manifest), 1)
    if bad_fraction > params.prepare.max_bad_fraction:
        first = bad[0]
        raise StageError(
            f"site {name}: {len(bad)} of {len(manifest)} images unreadable ({bad_fraction:.1%}), above "
            f"prepare.max_bad_fraction={params.prepare.max_bad_fraction}; first: {first['path']} ({first['reason']}). "
            f"Fix or remove the files, or raise the limit")
    _finish_store(staging, folder / IMAGES, len(kept))
    _finish_store(staged_signatures, folder / SIGNATURES, len(kept))
    metadata = manifest.iloc[kept].reset_index(drop=True)
    metadata["content_hash"] = hashes
    metadata.to_csv(folder / METADATA, index=False)
    return {
        "images": len(kept), "bad": len(bad), "bad_images": bad,
        "splits": {k: int(v) for k, v in metadata["split"].value_counts().sort_index().items()},
        "patients": int(metadata["patient_id"].nunique()),
        "missing": {"sex": int(metadata["sex"].isna().sum()), "age": int(metadata["age"].isna().sum())},
    }


def _splits(manifest: pd.DataFrame, site: Site, params: Params) -> pd.Series:
    if site.role == "external":
        return pd.Series("test", index=manifest.index)
    hashed = patient_splits(manifest["patient_id"], params.prepare.val_fraction, params.prepare.test_fraction,
                            params.base.seed)
    if site.role == "private":
        return hashed
    # The public source keeps its official (patient-level) split where it has one.
    return manifest["split"].where(manifest["split"].notna(), hashed)


def _load(task: tuple[str, int]) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """One image decoded once: its stored pixels and its near-duplicate signature, or why it is unreadable."""
    path, size = task
    try:
        gray = decode_file(Path(path))
    except ImageDecodeError as error:
        return None, None, str(error)
    return preprocess(gray, size), signature(gray), None


def _finish_store(staging: np.ndarray, final: Path, count: int) -> None:
    """Moves a staged array (``.<name>`` beside ``final``) into place, dropping the rows of skipped images."""
    staging.flush()
    staged = final.with_name(f".{final.name}")
    if count == staging.shape[0]:
        del staging
        staged.rename(final)
        return
    compact = np.lib.format.open_memmap(final, mode="w+", dtype=np.uint8, shape=(count, *staging.shape[1:]))
    compact[:] = staging[:count]
    compact.flush()
    del staging, compact
    staged.unlink()


@contextmanager
def _workers(count: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """A process pool when more than one worker is asked for (fork: workers share the imported modules)."""
    if count < 2:
        yield None
        return
    pool = multiprocessing.get_context("fork").Pool(count)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _log(params: Params, report: dict[str, object]) -> None:
    """Logs aggregates only: counts per site and split, throughput; never ids, paths or label statistics."""
    import mlflow

    with stage_run(STAGE):
        mlflow.log_params({"image_size": params.base.image_size, "uncertain": params.data.uncertain,
                           "not_mentioned": params.data.not_mentioned, "frontal_only": params.data.frontal_only,
                           "val_fraction": params.prepare.val_fraction, "test_fraction": params.prepare.test_fraction})
        metrics: dict[str, float] = {"images_per_second": report["images_per_second"]}
        for name, site in report["sites"].items():
            metrics[f"{name}.images"] = site["images"]
            metrics[f"{name}.bad"] = site["bad"]
            metrics.update({f"{name}.{split}": n for split, n in site["splits"].items()})
            metrics.update({f"{name}.dropped.{reason}": n for reason, n in site["dropped"].items()})
            metrics.update({f"{name}.labels_filled.{kind}": n for kind, n in site["labels_filled"].items()})
            metrics.update({f"{name}.missing.{column}": n for column, n in site["missing"].items()})
        mlflow.log_metrics(metrics)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.prepare [--params params.yaml] [-P key=value ...]``."""
    run_stage(STAGE, prepare, argv)


if __name__ == "__main__":
    main()

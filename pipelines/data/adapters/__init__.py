"""One adapter per real data set format, each turning the native files into the common manifest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipelines.data.adapters import chestxray14, chexpert, inhouse, mimic, padchest, vindr

FORMATS: dict[str, Callable[..., pd.DataFrame]] = {
    "mimic-cxr-jpg": mimic.read,
    "chexpert": chexpert.read,
    "chestxray14": chestxray14.read,
    "padchest": padchest.read,
    "vindr-cxr": vindr.read,
    "inhouse": inhouse.read,
}


def read_manifest(format_name: str, root: Path, site: str, **options: object) -> pd.DataFrame:
    """Reads one data set in its native format into the common manifest.

    Args:
        format_name: a key of ``FORMATS``.
        root: the data set's root folder.
        site: the name the manifest gives the site.
        **options: format-specific options (e.g. ``aggregation`` for VinDr-CXR).

    Raises:
        ValueError: unknown format.
        FileNotFoundError: the root folder does not exist.
    """
    if format_name not in FORMATS:
        raise ValueError(f"unknown data set format {format_name!r}; use one of {sorted(FORMATS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"site {site!r}: folder {root} does not exist; fix its path in params.yaml "
                                f"or run `make data` for the synthetic default")
    return FORMATS[format_name](root, site, **options)

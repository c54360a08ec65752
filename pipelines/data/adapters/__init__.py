"""One adapter per real data set format, each turning the native files into the common manifest."""

from __future__ import annotations

import inspect
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
        ValueError: unknown format or option.
        FileNotFoundError: the root folder does not exist.
    """
    if format_name not in FORMATS:
        raise ValueError(f"unknown data set format {format_name!r}; use one of {sorted(FORMATS)}")
    accepted = [name for name in inspect.signature(FORMATS[format_name]).parameters if name not in ("root", "site")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"site {site!r}: unknown option(s) {unknown} for format {format_name}; it takes "
                         f"{accepted or 'no options'}: fix options in params.yaml")
    if not root.is_dir():
        raise FileNotFoundError(f"site {site!r}: folder {root} does not exist; fix its path in params.yaml "
                                f"or run `make data` for the synthetic default")
    return FORMATS[format_name](root, site, **options)

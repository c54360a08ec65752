"""The common manifest that every dataset adapter produces, and the parsers shared by adapters.

A manifest is a pandas DataFrame with exactly ``MANIFEST_COLUMNS``:

- ``image_id``, ``patient_id``, ``study_id``: strings (never numbers: PadChest ids have 39 digits).
- ``site``: the configured site name; ``path``: absolute path of the image file.
- ``view``: ``PA``, ``AP``, ``LATERAL`` or ``OTHER``; only ``PA`` and ``AP`` are frontal.
- ``sex``: ``F``, ``M`` or null; ``age``: years as float, or null when unknown or implausible. String columns
  use pandas' ``string`` dtype, so their null is ``pd.NA``.
- ``split``: the data set's own split where it defines one (``train``, ``val``, ``test``), else null.
- one column per label in ``LABELS``: 1 positive, 0 negative, -1 uncertain, null not mentioned.
- ``excluded``: why a listed row cannot be used (``EXCLUSIONS``), else null; prepare drops and counts these rows.
  An adapter that never excludes a row may leave the column out.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from models.labels import LABELS

MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id", "patient_id", "study_id", "site", "path", "view", "sex", "age", "split", *LABELS, "excluded",
)
# Why an adapter excludes a listed row. Non-assessable: the readers marked the image as not reportable (PadChest's
# "exclude", "suboptimal study", or "unchanged" alone): no finding was assessed, so none may become a negative.
EXCLUSIONS = frozenset({"non-assessable"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
VIEWS = frozenset({"PA", "AP", "LATERAL", "OTHER"})
SPLITS = frozenset({"train", "val", "test"})
AGE_BINS: tuple[tuple[int, int], ...] = ((0, 30), (30, 60), (60, 70), (70, 80), (80, 100))
AGE_BIN_NAMES: tuple[str, ...] = tuple(f"[{lo},{hi}{']' if hi == 100 else ')'}" for lo, hi in AGE_BINS)
# Tokens that mean "missing" in the released CSVs (PadChest was cast to str before writing).
MISSING_TOKENS = frozenset({"", "nan", "NaN", "None", "none", "NULL", "null"})
MAX_PLAUSIBLE_AGE = 110.0
LABEL_VALUES = (1.0, 0.0, -1.0)   # positive, negative, uncertain (CheXpert's coding; blank: not mentioned)


def is_missing(value: object) -> bool:
    """Whether a raw cell means "no value" in any of the supported formats."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() in MISSING_TOKENS


def parse_sex(value: object) -> str | None:
    """Maps the sex encodings of all formats to ``F``/``M``/None (``O``, ``Unknown`` and blanks to None)."""
    if is_missing(value):
        return None
    token = str(value).strip().upper()
    return {"F": "F", "FEMALE": "F", "M": "M", "MALE": "M"}.get(token)


def valid_age(age: float | None, zero_is_missing: bool = True) -> float | None:
    """Returns the age when it is plausible (0 < age <= 110), else None.

    Args:
        age: years.
        zero_is_missing: 0 is a missing-value code (CheXpert, ChestX-ray14, the in-house schema); False where
            0 is a real age computed from dates (PadChest's infants born in the study year).
    """
    if age is None or not math.isfinite(age) or age < 0 or age > MAX_PLAUSIBLE_AGE or (age == 0 and zero_is_missing):
        return None
    return float(age)


def parse_number(value: object) -> float | None:
    """A float from a CSV cell, None when missing or not a number."""
    if is_missing(value):
        return None
    try:
        return float(str(value).strip())
    except ValueError:
        return None


_DICOM_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DICOM_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def parse_dicom_age(value: object) -> float | None:
    """Parses a DICOM Age String (``045Y``, ``006M``) to years; ``000Y`` and anything malformed to None."""
    if is_missing(value):
        return None
    match = _DICOM_AGE.match(str(value).strip().upper())
    if not match:
        return None
    return valid_age(int(match.group(1)) * _DICOM_AGE_UNIT_YEARS[match.group(2)])


def parse_labels(values: pd.Series, column: str, files: str | pd.Series) -> pd.Series:
    """A CheXpert-coded label column (``1.0``, ``0.0``, ``-1.0``, blank) as 1/0/-1/NaN.

    Args:
        values: the column's cells, as read.
        column: its name in the file.
        files: the file it was read from, or per row (when several files were concatenated).

    Raises:
        ValueError: a cell is another value; the message names the file, the column and the value.
    """
    numbers = values.map(parse_number)
    bad = values[~numbers.isin(LABEL_VALUES) & ~values.map(is_missing)]
    if len(bad):
        file = files if isinstance(files, str) else files[bad.index[0]]
        raise ValueError(f"{file}: column {column!r} has the value {bad.iloc[0]!r}; labels are 1.0, 0.0, -1.0 or "
                         f"blank: is this the right file for the site's format?")
    return numbers.astype("float64")


def finalize_manifest(frame: pd.DataFrame) -> pd.DataFrame:
    """Orders the columns and gives them their manifest dtypes.

    Raises:
        ValueError: a required column is missing.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns and c != "excluded"]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}")
    out = frame.reindex(columns=list(MANIFEST_COLUMNS)).copy()
    unknown = set(out["excluded"].dropna()) - EXCLUSIONS
    if unknown:
        raise ValueError(f"unknown exclusion reasons {sorted(unknown)}; use one of {sorted(EXCLUSIONS)}")
    for column in ("image_id", "patient_id", "study_id", "site", "path", "view", "sex", "split", "excluded"):
        out[column] = pd.array([None if is_missing(v) else str(v) for v in out[column]], dtype="string")
    out["age"] = pd.to_numeric(out["age"], errors="coerce").astype("float64")
    for label in LABELS:
        out[label] = pd.to_numeric(out[label], errors="coerce").astype("float64")
    return out.reset_index(drop=True)


def apply_label_policy(frame: pd.DataFrame, uncertain: str, not_mentioned: str) -> pd.DataFrame:
    """Turns uncertain (-1) and not-mentioned (null) labels into 1/0 as configured.

    The study counts both as negative; ``positive`` (U-Ones) is the other common choice.

    Args:
        frame: a manifest.
        uncertain: ``negative`` or ``positive``.
        not_mentioned: ``negative`` or ``positive``.

    Returns:
        A copy whose label columns hold only 0 and 1 (as int8).
    """
    value = {"negative": 0.0, "positive": 1.0}
    out = frame.copy()
    for label in LABELS:
        column = out[label].replace(-1.0, value[uncertain])
        out[label] = column.fillna(value[not_mentioned]).astype("int8")
    return out


def age_bin(age: pd.Series) -> pd.Series:
    """The study's age bins ([0,30) [30,60) [60,70) [70,80) [80,100]) as strings, null for unknown age."""
    edges = [lo for lo, _ in AGE_BINS] + [AGE_BINS[-1][1] + 1e-9]
    return pd.cut(age.clip(upper=100), bins=edges, right=False, labels=list(AGE_BIN_NAMES)).astype(object)

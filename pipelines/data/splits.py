"""Deterministic patient-level splits: every image of a patient lands in the same split.

A patient's split depends only on (seed, patient id), through a hash, so adding patients never moves the
others and no patient can be in two splits.
"""

from __future__ import annotations

import hashlib

import pandas as pd


def patient_unit_interval(patient_id: str, seed: int) -> float:
    """A uniform number in [0, 1) that depends only on the seed and the patient id."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def patient_splits(patient_ids: pd.Series, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """Assigns ``train``/``val``/``test`` per patient.

    Args:
        patient_ids: one patient id per image.
        val_fraction: expected share of patients in ``val``.
        test_fraction: expected share of patients in ``test``.
        seed: the split seed.

    Returns:
        The split of each image, aligned with ``patient_ids``.
    """
    def split_of(patient_id: str) -> str:
        u = patient_unit_interval(patient_id, seed)
        return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"

    return patient_ids.map({p: split_of(p) for p in patient_ids.unique()})

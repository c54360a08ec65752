"""The pretraining source manifest: what a pretrained model saw, and the check that it saw nothing private.

The pretrain stage stores ``source.json`` beside its weights (image content hashes and hashed patient ids of
the public source); a training run that starts from those weights refuses to when the private site shares any
image content, or any patient within one data set's id space, with the source: those images would be used
without the DP guarantee.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipelines.data.store import SiteStore

SOURCE = "source.json"


class SourceOverlapError(ValueError):
    """A pretraining source shares data with the private site, or its manifest is missing."""


def source_manifest(store: SiteStore, site: str, format: str, data_version: str) -> dict[str, object]:
    """What the pretraining saw, for overlap checks: image content hashes and hashed patient ids.

    Patient ids are only comparable within one data set's id space, so the format is recorded with them.
    """
    meta = store.metadata
    return {"site": site, "format": format, "data_version": data_version,
            "content_hashes": sorted(meta["content_hash"].dropna().astype(str).unique()),
            "patient_ids": sorted({hash_id(p) for p in meta["patient_id"].dropna().astype(str)})}


def hash_id(patient_id: str) -> str:
    """A patient id as stored in a source manifest (never the raw id)."""
    return hashlib.sha256(patient_id.encode()).hexdigest()


def refuse_overlap(source: Path, store: SiteStore, format: str) -> dict[str, int]:
    """Refuses a pretraining source that saw any private image or patient.

    Args:
        source: the pretrained model's ``source.json``.
        store: the private site.
        format: the private site's data-set format (patient ids compare within one format only).

    Returns:
        The overlap counts (all zero), for the privacy record.

    Raises:
        SourceOverlapError: the manifest is missing or the source shares images or patients with the site.
    """
    if not source.is_file():
        raise SourceOverlapError(f"{source} is missing: without the pretraining source manifest the overlap with "
                                 f"the private site cannot be checked; pretrain with this version's pretrain stage")
    manifest = json.loads(source.read_text())
    images = store.metadata["content_hash"].dropna().astype(str).isin(set(manifest["content_hashes"]))
    patients = 0
    if manifest["format"] == format:
        hashed = store.metadata["patient_id"].dropna().astype(str).map(hash_id)
        patients = int(hashed.isin(set(manifest["patient_ids"])).sum())
    if images.any() or patients:
        raise SourceOverlapError(f"the pretraining source {manifest['site']} shares {int(images.sum())} images and "
                                 f"{patients} patient images with the private site: pretrain on data disjoint from "
                                 f"it, or the private data would be used without the DP guarantee")
    return {"exact_copies": 0, "shared_patients": 0}

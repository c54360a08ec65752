"""The pretraining source manifest: what a pretrained model saw, and the check that it saw nothing private.

The pretrain stage stores ``source.json`` beside its weights (image content hashes, near-duplicate signatures
and hashed patient ids of the public source); a training run that starts from those weights refuses to when
the private site shares any image content (exact, or a near-duplicate such as a re-encoded copy), or any
patient within one data set's id space, with the source: those images would be used without the DP guarantee.

The near-duplicate signature of an image is the image preprocessed at 64 px (histogram-equalised, whatever
the training size) and box-averaged to 32 x 32; the prepare stage stores it for every image. Two images are
near-duplicates when their signatures differ by at most 3.5 grey levels RMS. Equalisation makes the signature
insensitive to monotone intensity changes and the averaging to re-encoding noise. Measured on the embedded
data: a copy re-encoded as JPEG (quality 75 or 90), with gamma 0.87 to 1.15, contrast 0.9, brightness +15,
Gaussian noise (sd 2) or a 256 -> 240 px resize stays within 2.96 of its original; distinct images of
different patients are at least 3.91 apart within one synthetic site (whose anatomy is far more alike than
real patients') and 19.45 apart across the private and public sites.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from models.preprocessing import preprocess
from pipelines.data.store import SiteStore

SOURCE = "source.json"
PRIVACY_RECORD = "privacy.json"
SIGNATURE_SIZE = 32
# Equalising a smaller image is too coarse: at 32 px a re-encoded copy moves up to 10 grey levels.
SIGNATURE_SOURCE_SIZE = 64
NEAR_DUPLICATE_RMS = 3.5


class SourceOverlapError(ValueError):
    """A pretraining source shares data with the private site, or its manifest is outdated."""


def source_manifest(store: SiteStore, site: str, format: str, data_version: str,
                    init: dict[str, object] | None = None) -> dict[str, object]:
    """What the pretraining saw, for overlap checks: content hashes, near-duplicate signatures, hashed patient ids.

    Patient ids are only comparable within one data set's id space, so the format is recorded with them.

    Args:
        store: the public source.
        site: its name.
        format: its data-set format.
        data_version: the data version it was read from.
        init: what the pretraining started from when that saw data (``weights_origin`` of a ``checkpoint:``
            init): checked with this manifest wherever the pretrained weights are used.
    """
    meta = store.metadata
    return {"site": site, "format": format, "data_version": data_version,
            "content_hashes": sorted(meta["content_hash"].dropna().astype(str).unique()),
            "patient_ids": sorted({hash_id(p) for p in meta["patient_id"].dropna().astype(str)}),
            "signature_size": SIGNATURE_SIZE,
            "signatures": base64.b64encode(np.ascontiguousarray(store.signatures).tobytes()).decode("ascii"),
            "init": init}


def weights_origin(path: Path) -> dict[str, object] | None:
    """What saved weights saw, from the record the project writes beside them.

    Args:
        path: a model folder or a weights file in one.

    Returns:
        The pretrain stage's source manifest (``source.json``); ``{"privacy_record": ...}`` for weights of the
        train stage (its ``privacy.json``); None when nothing says.
    """
    folder = path if path.is_dir() else path.parent
    if (folder / SOURCE).is_file():
        return json.loads((folder / SOURCE).read_text())
    if (folder / PRIVACY_RECORD).is_file():
        return {"privacy_record": json.loads((folder / PRIVACY_RECORD).read_text())}
    return None


def signature(gray: np.ndarray) -> np.ndarray:
    """The near-duplicate signature of one decoded image (as ``models.preprocessing.decode_file`` returns it).

    Returns:
        uint8 (32 * 32,).
    """
    equalised = Image.fromarray(preprocess(gray, SIGNATURE_SOURCE_SIZE))
    return np.asarray(equalised.resize((SIGNATURE_SIZE, SIGNATURE_SIZE), Image.Resampling.BOX)).ravel()


def near_duplicates(private: np.ndarray, source: np.ndarray, chunk: int = 1024) -> int:
    """How many private signatures have a near-duplicate among the source's (RMS distance <= 3.5 grey levels).

    Every pair is compared (one matrix product per chunk): O(N x M) work, 0.2 s for the embedded sites'
    2,374 x 2,406 images on two cores.
    """
    if not len(private) or not len(source):
        return 0
    # Centred float32 keeps the expanded squared distance exact to well under the threshold's 12,544.
    s = source.astype(np.float32) - 128
    s_norms = (s * s).sum(axis=1)
    limit = NEAR_DUPLICATE_RMS ** 2 * source.shape[1]
    hits = 0
    for start in range(0, len(private), chunk):
        p = private[start:start + chunk].astype(np.float32) - 128
        squared = (p * p).sum(axis=1)[:, None] + s_norms[None, :] - 2 * p @ s.T
        hits += int((squared.min(axis=1) <= limit).sum())
    return hits


def hash_id(patient_id: str) -> str:
    """A patient id as stored in a source manifest (never the raw id)."""
    return hashlib.sha256(patient_id.encode()).hexdigest()


def refuse_overlap(manifest: dict[str, object], store: SiteStore, format: str
                   ) -> tuple[dict[str, int], dict[str, object] | None]:
    """Refuses a pretraining source that saw any private image (or a near-duplicate of one) or patient.

    The check follows the chain of pretrainings (a manifest's ``init``) to its start.

    Args:
        manifest: the pretrained model's source manifest (``source.json``).
        store: the private site.
        format: the private site's data-set format (patient ids compare within one format only).

    Returns:
        The overlap counts (all zero), for the privacy record; and where the chain starts when that is not a
        source manifest (a train-stage privacy record, or ``{"unverified": path}``), for the caller to judge.

    Raises:
        SourceOverlapError: a manifest is outdated, or a source shares images or patients with the site.
    """
    private_signatures = np.asarray(store.signatures)
    while True:
        if manifest.get("signature_size") != SIGNATURE_SIZE:
            raise SourceOverlapError(f"the source manifest of {manifest['site']} has no near-duplicate signatures "
                                     f"(made by an older pretrain stage): re-encoded copies of private images "
                                     f"cannot be ruled out; rerun the pretrain stage")
        images = int(store.metadata["content_hash"].dropna().astype(str).isin(set(manifest["content_hashes"])).sum())
        source_signatures = np.frombuffer(base64.b64decode(manifest["signatures"]), np.uint8)
        near = near_duplicates(private_signatures, source_signatures.reshape(-1, SIGNATURE_SIZE ** 2))
        patients = 0
        if manifest["format"] == format:
            hashed = store.metadata["patient_id"].dropna().astype(str).map(hash_id)
            patients = int(hashed.isin(set(manifest["patient_ids"])).sum())
        if images or near or patients:
            raise SourceOverlapError(f"the pretraining source {manifest['site']} shares {images} identical images, "
                                     f"{near} near-duplicate images (e.g. re-encoded copies) and {patients} patient "
                                     f"images with the private site: pretrain on data disjoint from it, or the "
                                     f"private data would be used without the DP guarantee")
        start = manifest.get("init")
        if not start or "content_hashes" not in start:
            return {"exact_copies": 0, "near_duplicates": 0, "shared_patients": 0}, start or None
        manifest = start

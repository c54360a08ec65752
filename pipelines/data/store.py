"""The preprocessed image store: one uint8 array per site (``images.npy``, N x S x S) and its metadata table.

Row ``i`` of ``metadata.csv`` describes image ``i`` of the array, and row ``i`` of ``signatures.npy`` is its
near-duplicate signature (see ``pipelines.data.source``). Training opens the array memory-mapped, so
any image can be read at random (Poisson sampling needs that) without loading the whole site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data.schema import LABELS

IMAGES = "images.npy"
SIGNATURES = "signatures.npy"
METADATA = "metadata.csv"
ID_COLUMNS = ("image_id", "patient_id", "study_id", "site", "path", "view", "sex", "split", "source_split",
              "content_hash")


@dataclass(frozen=True)
class SiteStore:
    """A site's preprocessed images and metadata.

    Attributes:
        images: memory-mapped uint8 array (N, S, S).
        metadata: one row per image, in the array's order.
        signatures: memory-mapped uint8 (N, 32 * 32) near-duplicate signatures.
    """

    images: np.ndarray
    metadata: pd.DataFrame
    signatures: np.ndarray

    def split(self, name: str) -> tuple[np.ndarray, pd.DataFrame]:
        """The row indices and metadata of one split."""
        rows = np.flatnonzero(self.metadata["split"].to_numpy() == name)
        return rows, self.metadata.iloc[rows].reset_index(drop=True)


def open_site(folder: Path) -> SiteStore:
    """Opens a site written by the prepare stage.

    Raises:
        FileNotFoundError: the folder lacks the store; run the prepare stage first.
        ValueError: the array and the table disagree.
    """
    images_path, metadata_path, signatures_path = folder / IMAGES, folder / METADATA, folder / SIGNATURES
    if not images_path.is_file() or not metadata_path.is_file():
        raise FileNotFoundError(f"no image store in {folder}: run `dvc repro prepare` first")
    if not signatures_path.is_file():
        raise FileNotFoundError(f"{folder} has no {SIGNATURES} (made by an older prepare stage): rerun "
                                f"`dvc repro prepare`")
    images = np.load(images_path, mmap_mode="r")
    metadata = read_metadata(metadata_path)
    signatures = np.load(signatures_path, mmap_mode="r")
    if not len(metadata) == images.shape[0] == signatures.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} images, {signatures.shape[0]} signatures and {len(metadata)} "
                         f"metadata rows; rerun prepare")
    return SiteStore(images, metadata, signatures)


def read_metadata(path: Path) -> pd.DataFrame:
    """Reads a site's metadata table with ids as strings and labels as small integers."""
    dtypes = {column: "string" for column in ID_COLUMNS} | {label: "int8" for label in LABELS}
    return pd.read_csv(path, dtype=dtypes)

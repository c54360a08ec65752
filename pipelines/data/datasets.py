"""Torch datasets over a site's image store, by image or by patient (the two privacy units).

Both read single images from the memory-mapped store, so Poisson sampling can draw any subset at any step.
Augmentation (horizontal flip, rotation up to 7 degrees, as in the study's code) uses the global torch RNG,
which the training checkpoint saves and restores.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from models.convnext import normalize

MAX_ROTATION_DEGREES = 7.0


class ImageDataset(Dataset):
    """One item per image: (normalised image (1, S, S), float labels (L,)).

    Args:
        images: the store's uint8 array (N, S, S), memory-mapped.
        rows: which rows of the store belong to this dataset.
        labels: (len(rows), L) 0/1 labels in the model's order.
        augment: apply random flip and rotation.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray, augment: bool = False) -> None:
        self.images, self.rows, self.augment = images, np.asarray(rows), augment
        self.labels = torch.as_tensor(labels, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = normalize(torch.from_numpy(np.array(self.images[self.rows[index]])).unsqueeze(0))[0]
        if self.augment:
            image = augment(image)
        return image, self.labels[index]


class PatientDataset(Dataset):
    """One item per patient: a uniformly chosen image of that patient (per-patient privacy unit).

    Poisson sampling over this dataset samples patients; each sampled patient contributes one image per step,
    so a step never sees a patient twice and the accountant's N is the number of patients.

    Args:
        images: the store's uint8 array.
        rows: store rows of the training images.
        labels: their labels.
        patient_ids: their patient ids.
        augment: apply random flip and rotation.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray, patient_ids: np.ndarray,
                 augment: bool = False) -> None:
        self.by_image = ImageDataset(images, rows, labels, augment)
        _, inverse = np.unique(np.asarray(patient_ids, dtype=str), return_inverse=True)
        self.members = [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)] if len(rows) else []

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        members = self.members[index]
        pick = members[int(torch.randint(len(members), (1,)))]
        return self.by_image[int(pick)]


def augment(image: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip (p = 0.5) and rotation in [-7, 7] degrees of one (1, S, S) image."""
    if torch.rand(()) < 0.5:
        image = TF.horizontal_flip(image)
    angle = float((torch.rand(()) * 2 - 1) * MAX_ROTATION_DEGREES)
    return TF.rotate(image, angle)

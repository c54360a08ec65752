"""Self-supervised pretraining of the ConvNeXt backbone on unlabeled radiographs (the ``ssl`` pretraining method).

The methods' heads, losses, momentum updates and view augmentations are lightly's:

- ``simclr``: two views, a projection head, the NT-Xent contrastive loss over the batch (Chen et al., 2020).
- ``vicreg``: two views, an expander, variance-invariance-covariance regularisation (Bardes et al., 2022).
- ``byol``: an online network with a predictor regresses a momentum (EMA) target's projection of the other view
  (Grill et al., 2020).

The views suit grayscale radiographs: a random crop of at least ``min_scale`` of the image (the anatomy stays in
view), rotation up to 7 degrees (as the supervised augmentation), brightness and contrast jitter, Gaussian blur;
no hue or saturation (there is no colour), no grayscale conversion, and no horizontal flip (it would move the heart
to the other side, which no radiograph shows). Only the images are read: never a label column.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss, VICRegLoss
from lightly.models.modules import (
    BarlowTwinsProjectionHead,
    BYOLPredictionHead,
    BYOLProjectionHead,
    SimCLRProjectionHead,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import SimCLRTransform
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from models.convnext import INPUT_MEAN, INPUT_STD, features

METHODS = ("simclr", "vicreg", "byol")
MAX_ROTATION_DEGREES = 7.0
HIDDEN_DIM, PROJECTION_DIM = 512, 128


def radiograph_views(image_size: int, min_scale: float) -> SimCLRTransform:
    """Two random views of a grayscale radiograph (PIL ``L`` image), normalised as the model's input (1, S, S)."""
    return SimCLRTransform(input_size=image_size, min_scale=min_scale, cj_prob=0.8, cj_strength=1.0, cj_bright=0.4,
                           cj_contrast=0.4, cj_sat=0.0, cj_hue=0.0, random_gray_scale=0.0, gaussian_blur=0.5,
                           sigmas=(0.1, 1.0), hf_prob=0.0, vf_prob=0.0, rr_prob=1.0, rr_degrees=MAX_ROTATION_DEGREES,
                           normalize={"mean": [INPUT_MEAN], "std": [INPUT_STD]})


class UnlabeledViews(Dataset):
    """Two views per image of a site's store, from its pixels alone.

    Args:
        images: the store's uint8 array (N, S, S), memory-mapped.
        rows: the store rows to use.
        image_size: output size of each view.
        min_scale: the smallest crop, as a share of the image area.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, image_size: int, min_scale: float) -> None:
        self.images, self.rows = images, np.asarray(rows)
        self.views = radiograph_views(image_size, min_scale)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return self.views(Image.fromarray(np.asarray(self.images[self.rows[index]]), mode="L"))


class SelfSupervised(nn.Module):
    """A backbone with one method's heads and loss; only ``backbone`` is kept after pretraining.

    Args:
        backbone: the ConvNeXt (its classifier is not used).
        method: one of ``METHODS``.
    """

    def __init__(self, backbone: nn.Module, method: str) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown self-supervised method {method!r}; use one of {', '.join(METHODS)}")
        self.backbone, self.method = backbone, method
        width = backbone.num_features
        if method == "simclr":
            self.head = SimCLRProjectionHead(width, HIDDEN_DIM, PROJECTION_DIM)
            self.criterion = NTXentLoss(temperature=0.2)
        elif method == "vicreg":
            self.head = BarlowTwinsProjectionHead(width, HIDDEN_DIM, HIDDEN_DIM)
            self.criterion = VICRegLoss()
        else:
            self.head = BYOLProjectionHead(width, HIDDEN_DIM, PROJECTION_DIM)
            self.predictor = BYOLPredictionHead(PROJECTION_DIM, HIDDEN_DIM, PROJECTION_DIM)
            self.target_backbone, self.target_head = copy.deepcopy(backbone), copy.deepcopy(self.head)
            deactivate_requires_grad(self.target_backbone)
            deactivate_requires_grad(self.target_head)
            self.criterion = NegativeCosineSimilarity()

    def loss(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The method's loss on two views of the same batch of images."""
        if self.method != "byol":
            return self.criterion(self.head(features(self.backbone, first)), self.head(features(self.backbone, second)))
        online = [self.predictor(self.head(features(self.backbone, view))) for view in (first, second)]
        with torch.no_grad():
            target = [self.target_head(features(self.target_backbone, view)) for view in (first, second)]
        return 0.5 * (self.criterion(online[0], target[1]) + self.criterion(online[1], target[0]))

    def after_step(self, step: int, total_steps: int) -> None:
        """BYOL's target follows the online network with a momentum rising from 0.99 to 1 (cosine)."""
        if self.method == "byol":
            momentum = cosine_schedule(step, total_steps, 0.99, 1.0)
            update_momentum(self.backbone, self.target_backbone, m=momentum)
            update_momentum(self.head, self.target_head, m=momentum)

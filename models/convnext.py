"""The model factory: timm ConvNeXt with the five-label head and grayscale input, the same for training and serving.

A grayscale input (``in_chans=1``) is exactly equivalent to replicating the gray image into three channels:
timm sums a pretrained stem's RGB kernels when it adapts them, and the convolution is linear. Layer-scale
``gamma`` is folded into the following 1x1 projection (exact), so every block's parameters belong to layers
with their own per-sample gradient function (see ``models.per_sample``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import timm
import torch
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from torch import nn

from models.device import model_device
from models.labels import LABELS

SIZES = ("micro", "atto", "femto", "pico", "nano", "tiny", "small", "base")
# ``micro`` is not a timm size: atto's design (conv MLP) at one block per stage and fewer channels, 0.23M
# parameters (atto: 3.4M), for tests and smoke runs (a DP step costs per parameter per sample). No weights exist.
MICRO = {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128), "conv_mlp": True}
# Fixed input normalisation (uint8 / 255 -> centred): a constant, never estimated from private data.
INPUT_MEAN, INPUT_STD = 0.5, 0.5


def architecture(size: str) -> str:
    """The timm architecture name of a ConvNeXt size.

    Raises:
        ValueError: unknown size.
    """
    if size not in SIZES:
        raise ValueError(f"unknown ConvNeXt size {size!r}; use one of {', '.join(SIZES)}")
    return f"convnext_{size}"


def create_model(size: str, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Builds a DP-ready ConvNeXt: five-label head, one input channel, no layer-scale, no in-place ops.

    Args:
        size: ConvNeXt size (``micro``, ``atto`` ... ``base``).
        state_dict: weights in timm's layout (with or without ``gamma``); None keeps the random init.

    Returns:
        The model in training mode.
    """
    options = {"num_classes": len(LABELS), "in_chans": 1, "drop_path_rate": 0.0}
    if architecture(size) == "convnext_micro":
        model = ConvNeXt(**MICRO, **options)
    else:
        model = timm.create_model(architecture(size), pretrained=False, **options)
    if state_dict is not None and not any(key.endswith(".gamma") for key in state_dict):
        fold_layer_scale(model)         # the weights were saved folded: drop gamma before loading them
    if state_dict is not None:
        model.load_state_dict(state_dict)
    fold_layer_scale(model)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False      # in-place ops break Opacus' backward hooks
    return model


def fold_layer_scale(model: nn.Module) -> None:
    """Folds each block's layer-scale ``gamma`` into ``mlp.fc2`` (exactly) and removes it.

    ``gamma`` scales the block's output channels, which is the same as scaling the rows of the last projection
    and its bias. Without the bare ``gamma`` parameter Opacus can use per-layer gradient samplers instead of
    sending the whole block through functorch. ``create_model(ls_init_value=None)`` would not do this: timm
    drops keyword arguments whose value is None.
    """
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, ConvNeXtBlock) and block.gamma is not None:
                weight, bias = block.mlp.fc2.weight, block.mlp.fc2.bias
                weight.mul_(block.gamma.view(-1, *[1] * (weight.dim() - 1)))
                bias.mul_(block.gamma)
                block.gamma = None


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, S, S) -> float model input (N, 1, S, S) with the fixed normalisation."""
    return (images.float().unsqueeze(1) / 255.0 - INPUT_MEAN) / INPUT_STD


def predict(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Probabilities (N, L) for uint8 images (N, S, S), in eval mode without gradients."""
    out = _batched(lambda x: torch.sigmoid(model(x)), model, images, batch_size)
    return out if len(out) else np.zeros((0, len(LABELS)), dtype=np.float32)


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled, normalised features the head's classifier reads (N, model.num_features)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def embed(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``features`` (N, F) of uint8 images (N, S, S), in eval mode without gradients (for linear probes)."""
    return _batched(lambda x: features(model, x), model, images, batch_size)


def _batched(forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, images: np.ndarray,
             batch_size: int) -> np.ndarray:
    # Only the modules in training mode are switched (and back): ``model.eval()`` sets every module's flag, 0.3 ms
    # for atto each way, which the small batches of a busy inference API pay on every call.
    training = [module for module in model.modules() if module.training]
    for module in training:
        module.training = False
    device = model_device(model)
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.asarray(images[start:start + batch_size])).to(device)
                out.append(forward(normalize(batch)).float().cpu().numpy())
    finally:
        for module in training:
            module.training = True
    return np.concatenate(out) if out else np.zeros((0,), dtype=np.float32)


class OneDnnPointwise(nn.Conv2d):
    """A 1x1 convolution that PyTorch's oneDNN kernel computes from three images up, also on one thread.

    On one thread PyTorch sends a 1x1 convolution of fewer than 16 images to its fallback kernel, expecting it to
    beat oneDNN there; for the pointwise MLP of ConvNeXt atto to nano (1x1 convolutions) oneDNN is faster from three
    images: atto at 64 px costs 1.04 ms an image at a batch of 8 against 1.49 with the fallback (1.05-1.09 at 16 and
    32 either way), and the inference API's workers compute batches of 4-12 on one thread each. One or two images
    stay on the fallback, which is the faster there. Same parameters, same state dict, same outputs (float rounding).
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (input.dim() != 4 or len(input) < 3 or input.device.type != "cpu" or input.dtype != torch.float32
                or torch.is_grad_enabled()):
            return super()._conv_forward(input, weight, bias)
        return torch.mkldnn_convolution(input, weight, bias, (0, 0), self.stride, self.dilation, self.groups)


def use_onednn_pointwise(model: nn.Module) -> nn.Module:
    """Computes the model's 1x1 convolutions with ``OneDnnPointwise`` (in place), where PyTorch has oneDNN.

    For inference on one thread (the API's workers); training is unaffected, as the switch only acts without
    gradients.

    Returns:
        The same model.
    """
    if not torch.backends.mkldnn.is_available():
        return model
    for module in model.modules():
        if type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.padding in ((0, 0), "valid"):
            module.__class__ = OneDnnPointwise
    return model

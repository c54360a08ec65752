"""Initialization strategies: where a model's starting weights come from.

- ``scratch``: timm's random initialisation (seeded).
- ``imagenet``: supervised ImageNet weights (timm tags ``fb_in1k`` for tiny/small/base, ``d*_in1k`` for the
  small sizes).
- ``dinov3``: self-supervised DINOv3 weights (``convnext_<size>.dinov3_lvd1689m``; tiny, small, base).
- ``domain`` / ``ssl``: a model from the pretraining stage (supervised / self-supervised on the public source);
  the train stage resolves it through the MLflow registry (``models.registry``) or a folder (``domain:<path>``,
  ``ssl:<path>``), checks it shares no data with the private site and passes it here as ``checkpoint:<folder>``.
- ``checkpoint:<path>``: a folder with ``model.safetensors`` + ``spec.json``, or a timm-layout ``.safetensors``.

Real weights load offline from the Hugging Face cache (``HF_HUB_CACHE``) through timm's own loader, which
adapts the RGB stem to one channel and drops the ImageNet classifier; when they are absent the error names
the missing file and how to get it. Nothing here unpickles: only safetensors files are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from models.convnext import architecture, create_model
from models.labels import LABELS

STRATEGIES = ("scratch", "imagenet", "dinov3", "domain", "ssl", "checkpoint:<path>")
PRETRAINED_TAGS = {
    "imagenet": {"atto": "d2_in1k", "femto": "d1_in1k", "pico": "d1_in1k", "nano": "d1h_in1k",
                 "tiny": "fb_in1k", "small": "fb_in1k", "base": "fb_in1k"},
    "dinov3": {"tiny": "dinov3_lvd1689m", "small": "dinov3_lvd1689m", "base": "dinov3_lvd1689m"},
}


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that are not on this machine; the message says which file and how to get it."""


@dataclass(frozen=True)
class Initialized:
    """A freshly initialised model and where its weights came from."""

    model: nn.Module
    provenance: dict[str, str]


def initialize(init: str, size: str, seed: int) -> Initialized:
    """Builds a model of ``size`` with the weights of strategy ``init``.

    Args:
        init: one of ``STRATEGIES`` (``domain`` is resolved by the caller through the registry and passed as
            ``checkpoint:<folder>``).
        size: ConvNeXt size.
        seed: seeds the random parts (the head of pretrained models, everything for scratch).

    Raises:
        ValueError: unknown strategy or no such weights for this size.
        MissingWeightsError: the weights are not on this machine.
    """
    torch.manual_seed(seed)
    if init == "scratch":
        return Initialized(create_model(size), {"strategy": "scratch", "seed": str(seed)})
    if init in PRETRAINED_TAGS:
        tag = PRETRAINED_TAGS[init].get(size)
        if tag is None:
            raise ValueError(f"no {init} weights exist for convnext_{size}; "
                             f"available sizes: {', '.join(PRETRAINED_TAGS[init])}")
        name = f"{architecture(size)}.{tag}"
        path = hub_weights_file(name)
        return Initialized(_from_timm_file(name, path), {"strategy": init, "source": name, "file": str(path)})
    if init in ("domain", "ssl"):
        raise ValueError(f"the {init} initialization is resolved by the train stage (registry and overlap check); "
                         "here use checkpoint:<model folder>")
    if init.startswith("checkpoint:"):
        path = Path(init.removeprefix("checkpoint:"))
        return Initialized(load_checkpoint(path, size), {"strategy": "checkpoint", "source": str(path)})
    raise ValueError(f"unknown initialization {init!r}; use one of {', '.join(STRATEGIES)}")


def hub_weights_file(name: str) -> Path:
    """The cached ``model.safetensors`` of a timm pretrained tag, found offline.

    Raises:
        MissingWeightsError: not in the Hugging Face cache.
    """
    from huggingface_hub import try_to_load_from_cache

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id or f"timm/{name}"
    found = try_to_load_from_cache(repo_id=repo, filename="model.safetensors")
    if not isinstance(found, str):
        raise MissingWeightsError(
            f"weights for {name} not found: model.safetensors of {repo} is not in the Hugging Face cache "
            f"(HF_HUB_CACHE); on a machine with internet run `hf download {repo} model.safetensors` and copy "
            f"the cache here, or use init checkpoint:<file.safetensors>")
    return Path(found)


def _from_timm_file(name: str, path: Path) -> nn.Module:
    # timm's loader adapts the stem to one channel (sums RGB kernels) and drops a mismatched classifier.
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                               num_classes=len(LABELS), in_chans=1)
    return create_model(name.split(".")[0].removeprefix("convnext_"), state_dict=loaded.state_dict())


def load_checkpoint(path: Path, size: str) -> nn.Module:
    """Weights from a saved model folder (ours) or a timm-layout safetensors file.

    Raises:
        MissingWeightsError: the path does not exist.
        ValueError: the folder holds a model of another size.
    """
    from models.weights import SPEC, load_model

    if path.is_dir() and (path / SPEC).is_file():
        model, spec = load_model(path)
        if spec.size != size:
            raise ValueError(f"checkpoint {path} is convnext_{spec.size}, not convnext_{size}")
        return model
    if path.is_file() and path.suffix == ".safetensors":
        return _from_timm_file(architecture(size), path) if _is_imagenet_layout(path) else \
            create_model(size, state_dict=load_file(str(path)))
    raise MissingWeightsError(f"checkpoint {path} not found: give a model folder (model.safetensors + spec.json) "
                              f"or a .safetensors file")


def _is_imagenet_layout(path: Path) -> bool:
    """Whether a timm file still has the RGB stem or another head than ours (so timm must adapt it)."""
    with safe_open(str(path), framework="pt") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in ("stem.0.weight", "head.fc.weight")
                  if name in handle.keys()}
    stem, head = shapes.get("stem.0.weight"), shapes.get("head.fc.weight")
    return (stem is not None and stem[1] != 1) or head is None or head[0] != len(LABELS)

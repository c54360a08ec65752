"""Model weights on disk: ``model.safetensors`` plus ``spec.json``; loading never unpickles anything.

The spec says everything needed to rebuild the model and feed it: architecture, labels, input size and
normalisation, and where the initial weights came from.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from models.convnext import INPUT_MEAN, INPUT_STD, architecture, create_model
from models.labels import LABELS

WEIGHTS = "model.safetensors"
SPEC = "spec.json"


@dataclass(frozen=True)
class ModelSpec:
    """What a weights file is.

    Attributes:
        size: ConvNeXt size.
        image_size: input side in pixels.
        labels: output order.
        architecture: the timm architecture name.
        input_mean: fixed normalisation mean (on [0, 1] pixels).
        input_std: fixed normalisation std.
        preprocessing: the image pipeline the inputs went through.
        init: provenance of the initial weights (strategy, source, run id ...).
    """

    size: str
    image_size: int
    labels: tuple[str, ...] = LABELS
    architecture: str = ""
    input_mean: float = INPUT_MEAN
    input_std: float = INPUT_STD
    preprocessing: str = "grayscale, min-max, square resize, uint8, histogram equalisation (models.preprocessing)"
    init: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "architecture", architecture(self.size))
        object.__setattr__(self, "labels", tuple(self.labels))


def save_model(model: nn.Module, spec: ModelSpec, folder: Path) -> None:
    """Writes the weights and spec (atomically: a crash never leaves a half-written file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    _atomic(folder / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    _atomic(folder / SPEC, lambda tmp: tmp.write_text(json.dumps(asdict(spec), indent=2)))


def load_model(folder: Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuilds a saved model from its safetensors weights and spec.

    Raises:
        FileNotFoundError: the weights or the spec are missing; the message names the file.
    """
    spec = read_spec(folder)
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder / WEIGHTS} is missing: train or register the model first")
    return create_model(spec.size, state_dict=load_file(str(folder / WEIGHTS))), spec


def read_spec(folder: Path) -> ModelSpec:
    """The spec saved beside a model's weights (size, image size, labels, initialization).

    Raises:
        FileNotFoundError: the spec is missing.
    """
    if not (folder / SPEC).is_file():
        raise FileNotFoundError(f"{folder / SPEC} is missing: train or register the model first")
    raw = json.loads((folder / SPEC).read_text())
    raw.pop("architecture", None)
    return ModelSpec(**raw)


def _atomic(path: Path, write: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)

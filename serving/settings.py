"""The inference API's settings: the ``serve`` section of params.yaml and the registered model it serves.

The serving layer reads only these keys, so a deployed bento needs nothing of the training pipeline; the
pipeline's configuration (``pipelines.config``) embeds the same ``Serve`` model, so both check them alike.
What each key means is written once, in params.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Serve(BaseModel):
    """``serve:`` in params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    alias: str
    max_request_bytes: int = Field(gt=0)
    max_batch_size: int = Field(gt=0)
    min_image_side: int = Field(gt=0)
    token_env: str
    tracing: bool


@dataclass(frozen=True)
class ServingConfig:
    """What the service and the model import need.

    Attributes:
        serve: the ``serve`` section.
        registered_model: ``register.name``, the registered model whose alias ``serve.alias`` is served.
        device: ``base.device``, where the model computes (``models.device.resolve_device``).
    """

    serve: Serve
    registered_model: str
    device: str


def load_serving_config(path: Path) -> ServingConfig:
    """Reads the serving keys of a params.yaml.

    Raises:
        ValueError: the file or a key is wrong; one line naming the key.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
        return ServingConfig(Serve.model_validate(raw["serve"]), str(raw["register"]["name"]),
                             str(raw["base"]["device"]))
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: cannot read serve, register.name and base.device ({error!r}): point "
                         f"DP_CXR_PARAMS at the project's params.yaml") from None
    except ValidationError as error:
        first = error.errors()[0]
        raise ValueError(f"{path}: serve.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None

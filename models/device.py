"""Where tensors live: ``base.device`` (``auto | cpu | cuda``) resolved once per process.

Every stage that computes (pretrain, train, audit, evaluate) and the inference API resolve the setting here, move
the model once and send each batch after it. Under ``torchrun`` each process takes the GPU of its ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
import sys

import torch

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(RuntimeError):
    """The configured device is not available on this machine."""


def resolve_device(setting: str, who: str = "base.device") -> torch.device:
    """The device ``setting`` names on this machine.

    ``auto`` is CUDA when a CUDA device is visible and otherwise the CPU (it says so on stderr); ``cuda`` on a
    machine without one is an error rather than a silent CPU run that would take days.

    Args:
        setting: ``auto``, ``cpu`` or ``cuda``.
        who: the config key, for messages.

    Raises:
        DeviceError: ``cuda`` was asked for and no CUDA device is visible, or the setting is unknown.
    """
    if setting not in DEVICES:
        raise DeviceError(f"{who}: unknown device {setting!r}; use auto, cpu or cuda")
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if setting == "cuda":
        raise DeviceError(f"{who}: cuda, but torch sees no CUDA device (torch {torch.__version__}, built for CUDA "
                          f"{torch.version.cuda or 'none'}): set {who}: auto or cpu, or run on a machine with a GPU")
    print(f"{who}: auto: no CUDA device visible, computing on the CPU", file=sys.stderr)
    return torch.device("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))

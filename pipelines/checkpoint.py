"""Per-epoch training checkpoints (train and pretrain): safetensors + JSON, never pickle.

A checkpoint holds the weights, the optimizer state, the torch RNG state and a JSON ``state`` (progress, history
and, for private runs, the accountant's history), written atomically so a kill never leaves half of one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.atomic import atomic_folder

CHECKPOINT = "checkpoint"


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, object]) -> None:
    """Writes ``folder`` (replacing the previous checkpoint only once the new one is complete).

    Args:
        folder: the checkpoint folder.
        model: the plain (unwrapped) model.
        optimizer: its optimizer.
        state: JSON-serialisable progress to restore with the weights.
    """
    opt = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.contiguous() for index, entries in opt["state"].items()
               for key, value in entries.items() if isinstance(value, torch.Tensor)}
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {**state, "param_groups": opt["param_groups"]}
    with atomic_folder(folder) as partial:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(partial / "model.safetensors"))
        save_file(tensors, str(partial / "optimizer.safetensors"))
        (partial / "state.json").write_text(json.dumps(meta, indent=2, default=float))


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    """Restores weights, optimizer and RNG from ``folder`` and returns the saved ``state``."""
    meta = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta.pop("param_groups")})
    return meta

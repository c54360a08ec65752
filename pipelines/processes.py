"""Training one cell in several processes: the ``torchrun`` launch and the process group each process joins.

``train.processes: N`` (N > 1) makes ``python -m pipelines.train`` start itself again under PyTorch's
``torchrun --standalone --nproc-per-node N`` (one machine); on several machines the user runs ``torchrun`` with
``--nnodes`` and a rendezvous, and the stage joins the group torchrun made. Each process trains a shard of the
data with Opacus' distributed path (``models.privacy.make_private``); rank 0 alone writes the outputs, the
ledgers and the MLflow run. The backend is NCCL when the processes compute on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

# What torchrun sets in every process it starts.
LAUNCHED_BY_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Processes:
    """This process's place among those training one cell (rank 0 of 1 when not distributed) and its device."""

    rank: int
    count: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs, the ledgers and the MLflow run."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process (it sets the rank, world size and rendezvous address)."""
    return all(key in os.environ for key in LAUNCHED_BY_TORCHRUN)


def relaunch_with_torchrun(module: str, processes: int, argv: list[str], env: dict[str, str]) -> int:
    """Runs ``python -m module argv`` in ``processes`` processes on this machine under torchrun; its exit status.

    ``--standalone`` makes torchrun pick a free local rendezvous port, so two cells can train side by side. If one
    process fails, torchrun stops the others, and the non-zero status stops the stage.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", module, *argv]
    print(f"{module}: training in {processes} processes: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    return subprocess.run(command, check=False, env=env).returncode


@contextmanager
def process_group(device: torch.device) -> Iterator[Processes]:
    """Joins torchrun's process group for the duration (nothing to join when torchrun did not start us).

    Args:
        device: where this process computes; CUDA uses NCCL (one GPU per process), the CPU gloo.
    """
    if not launched_by_torchrun():
        yield Processes(0, 1, device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                            if device.type == "cuda" else None)
    try:
        yield Processes(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def from_main(value: object, processes: Processes) -> object:
    """Rank 0's ``value`` in every process (e.g. the progress a resumed run restored); unchanged in one process."""
    if processes.count == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def share_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, processes: Processes) -> None:
    """Rank 0's weights and optimizer state in every process (after rank 0 restored a checkpoint)."""
    if processes.count == 1:
        return
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    # Sent through the CPU: load_state_dict moves each tensor to its parameter's device on the receiving side.
    state = optimizer.state_dict() if processes.main else None
    if processes.main:
        state = {**state, "state": {k: {n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                                    for k, s in state["state"].items()}}
    state = from_main(state, processes)
    if not processes.main:
        optimizer.load_state_dict(state)

"""DP-SGD on a GPU: step time against non-private training, images/s and peak memory; the 2-GPU equivalence check.

1. Time: for ConvNeXt atto, tiny and small at 128 and 224 px, one logical batch (default 1,024, Poisson-sampled,
   physical batches of ``--physical``) of DP-SGD with the default engine (``bk``) against the same number of
   examples trained non-privately in the same physical batches; both with AdamW, in turn, median over rounds.
   Prints per row the DP and non-private seconds per logical step, DP images/s and the DP/non-private ratio.
2. Memory: peak GPU memory (``torch.cuda.max_memory_allocated``) of DP steps of the largest model at the largest
   size with logical batch 256 and 4,096 at the same physical batch, and their ratio.
3. Distributed (2 GPUs or more): one DP step in two processes (NCCL, Opacus DPDDP, noise off) against one process
   over the union of the two ranks' examples; prints the largest difference of the updates.

Targets (issue 16, for the GPU run): DP/non-private ratio <= 1.5x for convnext_small at 224 px; peak memory at
logical batch 4,096 within 10% of that at 256. It runs in under 8 minutes on one H100/H200-class GPU.
``--cpu`` runs the same code on the CPU at a tiny size (convnext_micro, 32 px, logical batch 64): how the test
suite exercises it; its figures say nothing about GPUs.

    .venv/bin/python benchmarks/gpu.py [--rounds 3] [--logical 1024] [--physical 128] [--cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import Dataset

from models.convnext import create_model
from models.labels import LABELS
from models.privacy import Mechanism, Randomness, ends_logical_step, make_private
from serving.launch import free_port

POOL = 256          # distinct images: the data set repeats them, so its size costs no memory


class Repeated(Dataset):
    """``size`` examples drawn from a pool of ``POOL`` random images (on the CPU, as a real loader's are)."""

    def __init__(self, size: int, side: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.size = size
        self.images = torch.randn(POOL, 1, side, side, generator=generator)
        self.labels = (torch.rand(POOL, len(LABELS), generator=generator) < 0.3).float()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index % POOL], self.labels[index % POOL]


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none").sum(1).mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dp_step(size: str, side: int, logical: int, physical: int, device: torch.device, engine: str = "bk"
            ) -> tuple[float, int]:
    """Seconds of one Poisson-sampled logical DP step (after a warm-up step), and its number of examples."""
    torch.manual_seed(0)
    model = create_model(size).to(device)
    data = Repeated(8 * logical, side)
    dp = make_private(model, torch.optim.AdamW(model.parameters()), data, mechanism=Mechanism(1.0, 1 / 8, 8),
                      max_grad_norm=1.0, logical_batch=logical, accountant="prv",
                      randomness=Randomness.secret(device), engine=engine)
    times, examples, started = [], 0, time.perf_counter()
    with BatchMemoryManager(data_loader=dp.loader, max_physical_batch_size=physical, optimizer=dp.optimizer) as batches:
        for x, y in batches:
            last = ends_logical_step(dp.optimizer)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            dp.optimizer.zero_grad()
            _loss(dp.model, x, y).backward()
            dp.optimizer.step()
            examples += len(x)
            if last:
                _sync(device)
                times.append((time.perf_counter() - started, examples))
                if len(times) == 2:
                    break
                examples, started = 0, time.perf_counter()
    return times[1]


def plain_step(size: str, side: int, examples: int, physical: int, device: torch.device) -> float:
    """Seconds of ``examples`` trained non-privately in physical batches with one optimizer step (after a warm-up)."""
    torch.manual_seed(0)
    model = create_model(size).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    data = Repeated(examples, side)
    chunks = [(data.images[:n].to(device), data.labels[:n].to(device))
              for n in [physical] * (examples // physical) + ([examples % physical] if examples % physical else [])]
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        optimizer.zero_grad()
        for x, y in chunks:
            (_loss(model, x, y) * len(x) / examples).backward()
        optimizer.step()
        _sync(device)
        seconds.append(time.perf_counter() - started)
    return seconds[1]


def peak_memory(size: str, side: int, logical: int, physical: int, device: torch.device) -> float:
    """Peak memory (MiB) of DP steps at this logical batch: the GPU's allocator peak, or RSS growth on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        dp_step(size, side, logical, physical, device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    before = psutil.Process().memory_info().rss
    dp_step(size, side, logical, physical, device)
    return (psutil.Process().memory_info().rss - before) / 2**20


def _rank_update(rank: int, world: int, port: int, backend: str, side: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        out[rank] = update_over(list(range(rank, 24, world)), side, device)
    finally:
        dist.destroy_process_group()


def update_over(indices: list[int], side: int, device: torch.device) -> torch.Tensor:
    """The parameter update of one noiseless DP-SGD step (SGD, lr 1, C = 0.05) over ``indices`` of a fixed set."""
    torch.manual_seed(0)
    model = create_model("micro").to(device)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    data = Repeated(96, side)
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), data, mechanism=Mechanism(0.0, 0.25, 4),
                      max_grad_norm=0.05, logical_batch=24, accountant="prv", randomness=Randomness.secret(device))
    x, y = data.images[indices].to(device), data.labels[indices].to(device)
    dp.optimizer.zero_grad()
    _loss(dp.model, x, y).backward()
    dp.optimizer.step()
    return (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).cpu()


def distributed_difference(side: int, backend: str) -> float:
    """Largest |update| difference between a 2-process step and one process over the union of their examples."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank_update, args=(2, free_port(), backend, side, out), nprocs=2, start_method="spawn")
        ranks = [out[0], out[1]]
    single = update_over(list(range(24)), side, torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu"))
    return max(float((rank - single).abs().max()) for rank in ranks)


def main() -> None:
    """Prints the tables (exit status 2 without CUDA unless ``--cpu``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--logical", type=int, default=1024)
    parser.add_argument("--physical", type=int, default=128)
    parser.add_argument("--cpu", action="store_true", help="run the code path on the CPU at a tiny size (tests)")
    args = parser.parse_args()
    if args.cpu:
        device, sizes, sides, logical, physical, memory = torch.device("cpu"), ["micro"], [32], 64, 32, (32, 256)
    elif torch.cuda.is_available():
        device, sizes, sides, logical, physical = torch.device("cuda", 0), ["atto", "tiny", "small"], [128, 224], \
            args.logical, args.physical
        memory = (256, 4096)
    else:
        print(f"benchmarks/gpu.py: no CUDA device visible (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}): run it on a machine with an NVIDIA GPU (or --cpu for a tiny CPU run "
              f"of its code path)", file=sys.stderr)
        raise SystemExit(2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; logical batch {logical}, physical {physical}; engine bk")
    print(f"{'model':>6} {'px':>4} {'DP s/step':>10} {'plain s/step':>12} {'DP img/s':>9} {'DP/plain':>9}")
    for size in sizes:
        for side in sides:
            rounds = []
            for _ in range(args.rounds):
                dp_seconds, examples = dp_step(size, side, logical, physical, device)
                rounds.append((dp_seconds, plain_step(size, side, max(examples, 1), physical, device), examples))
            dp_seconds, plain_seconds, examples = (statistics.median(r[k] for r in rounds) for k in range(3))
            print(f"{size:>6} {side:>4} {dp_seconds:>10.3f} {plain_seconds:>12.3f} {examples / dp_seconds:>9.1f} "
                  f"{dp_seconds / plain_seconds:>8.2f}x", flush=True)
    small, large = (peak_memory(sizes[-1], sides[-1], batch, physical, device) for batch in memory)
    print(f"peak memory, convnext_{sizes[-1]} {sides[-1]} px, physical {physical}: logical {memory[0]}: "
          f"{small:.0f} MiB, logical {memory[1]}: {large:.0f} MiB, ratio {large / max(small, 1e-9):.3f}")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if args.cpu or gpus >= 2:
        backend = "gloo" if args.cpu else "nccl"
        print(f"2-process DP step ({backend}) against one process over the union: largest update difference "
              f"{distributed_difference(sides[0], backend):.2e}")
    else:
        print("2-process check: skipped (one GPU; it needs two)")


if __name__ == "__main__":
    main()

"""DP-SGD step cost on convnext_atto: time ratio against non-private, and memory against the logical batch.

1. Time: for 64, 128 and 224 px, a non-private step (plain model, AdamW) and a DP step (Opacus hooks with the
   exact samplers of ``models.per_sample``, BoundedClipDPOptimizer, noise) on the same batch of 32, built in
   one process and stepped in turn (A B A B ...). Prints the median of the per-round DP/non-private ratios.
2. Memory: DP steps with logical batch 256 and 4096 at physical batch 64 (BatchMemoryManager, Poisson
   sampling), each in a fresh process; prints the peak RSS growth (sampled every 2 ms) and the ratio on the
   same number of examples (16 x 256 against 1 x 4096).

Targets (issue 4): ratio <= 3.5x at 64 px and <= 2.5x at 128 px; memory independent of the logical batch
within 10%.

    .venv/bin/python benchmarks/dp_step.py [--rounds 7] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

MEMORY_PROBE = r"""
import json, sys, threading, time, psutil, torch
from torch.utils.data import Dataset
from opacus.utils.batch_memory_manager import BatchMemoryManager
from models.convnext import create_model
from models.privacy import Randomness, ends_logical_step, make_private, plan_mechanism

class Synthetic(Dataset):            # images made on demand, so the data set itself takes no memory
    def __len__(self): return 8192
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(1, 64, 64, generator=g), (torch.rand(5, generator=g) > 0.5).float()

logical, steps = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = create_model("atto")
mechanism = plan_mechanism(len(Synthetic()), epsilon=8.0, delta=1e-5, epochs=1, logical_batch=logical, accountant="prv")
dp = make_private(model, torch.optim.AdamW(model.parameters()), Synthetic(), mechanism=mechanism, max_grad_norm=1.0,
                  logical_batch=logical, accountant="prv", randomness=Randomness.secret())
# ru_maxrss already holds the import-time peak of the CUDA-enabled torch build: sample the current RSS instead.
process, peak, running = psutil.Process(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.002)
before = process.memory_info().rss
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
with BatchMemoryManager(data_loader=dp.loader, max_physical_batch_size=64, optimizer=dp.optimizer) as batches:
    for x, y in batches:
        last = ends_logical_step(dp.optimizer)
        dp.optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(dp.model(x), y, reduction="none").sum(1).mean().backward()
        dp.optimizer.step()
        if last:
            steps -= 1
            if steps == 0:
                break
running[0] = False
sampler.join()
print(json.dumps({"logical": logical, "peak_growth_mb": (peak[0] - before) / 2**20}))
"""


def step_ratio(size: int, rounds: int, batch: int = 32) -> tuple[float, float, float]:
    from opacus import GradSampleModule

    from models.convnext import create_model
    from models.privacy import BoundedClipDPOptimizer  # importing it registers the exact samplers

    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, size, size), (torch.rand(batch, 5) > 0.5).float()
    plain = create_model("atto")
    plain_opt = torch.optim.AdamW(plain.parameters())
    private = GradSampleModule(create_model("atto"))
    private_opt = BoundedClipDPOptimizer(torch.optim.AdamW(private.parameters()), noise_multiplier=1.0,
                                         max_grad_norm=1.0, expected_batch_size=batch)

    def loss(model: torch.nn.Module) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none").sum(1).mean()

    def plain_step() -> None:
        plain_opt.zero_grad()
        loss(plain).backward()
        plain_opt.step()

    def private_step() -> None:
        private_opt.zero_grad()
        loss(private).backward()
        private_opt.step()

    def timed(step) -> float:
        started = time.perf_counter()
        step()
        return time.perf_counter() - started

    for _ in range(2):
        plain_step(), private_step()
    ratios, plain_times, private_times = [], [], []
    for _ in range(rounds):
        a, b = timed(plain_step), timed(private_step)
        plain_times.append(a), private_times.append(b), ratios.append(b / a)
    return statistics.median(ratios), batch / statistics.median(plain_times), batch / statistics.median(private_times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for size in (64, 128, 224):
        ratio, plain_ips, private_ips = step_ratio(size, args.rounds)
        print(f"convnext_atto {size:>3} px, batch 32: DP/non-private step time {ratio:.2f}x "
              f"(non-private {plain_ips:.1f} img/s, DP {private_ips:.1f} img/s)", flush=True)
    if args.skip_memory:
        return
    # RSS also creeps up with the number of physical batches run (allocator and kernel caches), so the two
    # logical batch sizes are compared on the same work: 16 steps of 256 against 1 step of 4096 examples.
    peaks = {}
    for logical, steps in ((256, 1), (256, 16), (4096, 1)):
        # Large blocks straight from mmap, so RSS follows live memory rather than glibc's cached free blocks.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(logical), str(steps)], capture_output=True,
                             text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        peaks[logical, steps] = json.loads(out)["peak_growth_mb"]
        print(f"logical batch {logical:>4} x {steps:>2} step(s), physical 64, 64 px: peak RSS growth "
              f"{peaks[logical, steps]:.0f} MB", flush=True)
    print(f"peak memory ratio logical 4096 / 256 on the same 4096 examples: "
          f"{peaks[4096, 1] / peaks[256, 16]:.2f}x")


if __name__ == "__main__":
    main()

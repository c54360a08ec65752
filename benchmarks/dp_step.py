"""DP-SGD step cost on convnext_atto, engine by engine: time against non-private, memory against the logical batch.

1. Time: for 64, 128 and 224 px, on the same batch of 32 and AdamW, built in one process and stepped in turn
   (non-private, stock, samplers, bk, non-private, ...):
   - non-private: the plain model;
   - stock: Opacus hooks with Opacus' own per-sample gradient samplers made correct (activations made contiguous
     for its Conv2d sampler, its copy into a zero-filled buffer) and the bounded clipping;
   - samplers: ``train.engine: samplers`` (the exact samplers of ``models.per_sample``);
   - bk: ``train.engine: bk`` (``models.book_keeping``).
   Prints, per engine, the median over rounds of the DP/non-private step-time ratio, and images per second.
2. Memory (``--memory``): DP steps of the default engine with logical batch 256 and 4096 at physical batch 64
   (BatchMemoryManager, Poisson sampling), each in a fresh process; prints the peak RSS growth (sampled every
   2 ms) and the ratio on the same number of examples (16 x 256 against 1 x 4096).
3. Layers (``--layers``): every Linear and dense Conv2d of convnext_atto, both book-keeping norm routes timed,
   against the route ``models.book_keeping.prefers_ghost`` picks.

Targets (issue 18, bk): ratio <= 1.6x at 64 px, <= 1.3x at 128 px, <= 1.15x at 224 px; memory independent of
the logical batch within 10%.

    .venv/bin/python benchmarks/dp_step.py [--rounds 5] [--sizes 64 128 224] [--memory] [--layers]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

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

logical, steps, engine = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = create_model("atto")
mechanism = plan_mechanism(len(Synthetic()), epsilon=8.0, delta=1e-5, epochs=1, logical_batch=logical, accountant="prv")
dp = make_private(model, torch.optim.AdamW(model.parameters()), Synthetic(), mechanism=mechanism, max_grad_norm=1.0,
                  logical_batch=logical, accountant="prv", randomness=Randomness.secret(), engine=engine)
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


ENGINES = ("stock", "samplers", "bk")


@contextlib.contextmanager
def stock_opacus() -> Iterator[None]:
    """Opacus' own Conv2d sampler (on contiguous activations, which makes it correct) and its copying accumulation."""
    from opacus.grad_sample import grad_sample_module
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from models import per_sample

    samplers = grad_sample_module.GradSampleModule.GRAD_SAMPLERS
    ours = samplers[torch.nn.Conv2d]
    samplers[torch.nn.Conv2d] = lambda layer, activations, backprops: compute_conv_grad_sample(
        layer, [activations[0].contiguous()], backprops)
    grad_sample_module.create_or_accumulate_grad_sample = per_sample._create_or_accumulate
    try:
        yield
    finally:
        samplers[torch.nn.Conv2d] = ours
        grad_sample_module.create_or_accumulate_grad_sample = per_sample._adopt_or_accumulate


def step_ratios(size: int, rounds: int, batch: int = 32) -> dict[str, tuple[float, float]]:
    """{engine: (median DP/non-private step-time ratio, DP images per second)}, plus the non-private img/s."""
    from opacus import GradSampleModule

    from models.book_keeping import BookKeeping, BookKeepingDPOptimizer
    from models.convnext import create_model
    from models.privacy import BoundedClipDPOptimizer

    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, size, size), (torch.rand(batch, 5) > 0.5).float()

    def loss(model: torch.nn.Module) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none").sum(1).mean()

    def stepper(engine: str):
        model = create_model("atto")
        if engine == "non-private":
            optimizer = torch.optim.AdamW(model.parameters())
        else:
            kind = BookKeepingDPOptimizer if engine == "bk" else BoundedClipDPOptimizer
            optimizer = kind(torch.optim.AdamW(model.parameters()), noise_multiplier=1.0, max_grad_norm=1.0,
                             expected_batch_size=batch)
            if engine == "bk":
                optimizer.book = BookKeeping(model)
            else:
                model = GradSampleModule(model)

        def step() -> float:
            started = time.perf_counter()
            with stock_opacus() if engine == "stock" else contextlib.nullcontext():
                optimizer.zero_grad()
                loss(model).backward()
                optimizer.step()
            return time.perf_counter() - started
        return step

    steps = {engine: stepper(engine) for engine in ("non-private", *ENGINES)}
    for step in steps.values():
        step()                                       # warm-up
    times: dict[str, list[float]] = {engine: [] for engine in steps}
    for _ in range(rounds):
        for engine, step in steps.items():
            times[engine].append(step())
    base = times["non-private"]
    result = {engine: (statistics.median(t / b for t, b in zip(times[engine], base, strict=True)),
                       batch / statistics.median(times[engine])) for engine in ENGINES}
    result["non-private"] = (1.0, batch / statistics.median(base))
    return result


def layer_routes(size: int, batch: int = 32, repeats: int = 3) -> list[dict[str, object]]:
    """For each Linear / dense Conv2d of convnext_atto at ``size`` px: both book-keeping routes timed.

    Returns one row per layer: tokens, fan-in, fan-out, the ghost and the materialising route's time (norms and
    clipped sum, median of ``repeats``), the cost model's choice and the faster route.
    """
    from models import book_keeping
    from models.convnext import create_model

    torch.manual_seed(0)
    model = create_model("atto")
    book = book_keeping.BookKeeping(model)
    x, y = torch.randn(batch, 1, size, size), (torch.rand(batch, 5) > 0.5).float()
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum").backward()
    weights = torch.rand(batch, dtype=torch.float64)
    rows = []
    for layer in book.layers:
        if layer.kind not in ("linear", "conv"):
            continue
        module, record = layer.module, layer.passes[0]
        a, g = book_keeping._tokens(module, record.activation, record.grad)
        ghost, materialise = (_route_time(module, record, weights, route, repeats) for route in (True, False))
        chosen = book_keeping.prefers_ghost(a.shape[1], a.shape[2], g.shape[2])
        rows.append({"tokens": a.shape[1], "in": a.shape[2], "out": g.shape[2], "ghost_ms": 1e3 * ghost,
                     "materialise_ms": 1e3 * materialise, "chosen": "ghost" if chosen else "materialise",
                     "faster": "ghost" if ghost < materialise else "materialise"})
    book.close()
    return rows


def _route_time(module: torch.nn.Module, record: object, weights: torch.Tensor, ghost: bool, repeats: int) -> float:
    from models import book_keeping

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        _, finish = book_keeping._dense_rule(module, record.activation, record.grad, ghost=ghost)
        finish(weights)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--memory", action="store_true", help="also the peak memory against the logical batch")
    parser.add_argument("--layers", action="store_true", help="also both norm routes of every dense layer")
    parser.add_argument("--engine", default="bk", choices=("samplers", "bk"), help="the engine --memory measures")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for size in args.sizes:
        result = step_ratios(size, args.rounds)
        print(f"convnext_atto {size:>3} px, batch 32, non-private {result['non-private'][1]:.1f} img/s; "
              "DP/non-private step time: " + ", ".join(
                  f"{engine} {result[engine][0]:.2f}x ({result[engine][1]:.1f} img/s)" for engine in ENGINES),
              flush=True)
    if args.layers:
        for size in args.sizes:
            print(f"{size} px: tokens  in  out  ghost ms  materialise ms  chosen  faster")
            for row in layer_routes(size):
                print(f"{size:>6} {row['tokens']:>7} {row['in']:>4} {row['out']:>4} {row['ghost_ms']:9.2f} "
                      f"{row['materialise_ms']:15.2f}  {row['chosen']:<11} {row['faster']}", flush=True)
    if not args.memory:
        return
    # RSS also creeps up with the number of physical batches run (allocator and kernel caches), so the two
    # logical batch sizes are compared on the same work: 16 steps of 256 against 1 step of 4096 examples.
    peaks = {}
    for logical, steps in ((256, 1), (256, 16), (4096, 1)):
        # Large blocks straight from mmap, so RSS follows live memory rather than glibc's cached free blocks.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(logical), str(steps), args.engine],
                             capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        peaks[logical, steps] = json.loads(out)["peak_growth_mb"]
        print(f"{args.engine}: logical batch {logical:>4} x {steps:>2} step(s), physical 64, 64 px: peak RSS growth "
              f"{peaks[logical, steps]:.0f} MB", flush=True)
    print(f"{args.engine}: peak memory ratio logical 4096 / 256 on the same 4096 examples: "
          f"{peaks[4096, 1] / peaks[256, 16]:.2f}x")


if __name__ == "__main__":
    main()

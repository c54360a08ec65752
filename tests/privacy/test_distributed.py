"""DP-SGD in two processes (gloo on CPU, Opacus' DPDDP and distributed optimizer, as torchrun runs it): the same
update as one process over the union of the ranks' examples, the noise added once per logical step, every rank
taking every logical step, and the same sigma, q and steps (so epsilon) as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from models.convnext import create_model
from models.labels import LABELS
from models.privacy import EveryStepSampler, Mechanism, Randomness, make_private, plan_mechanism
from serving.launch import free_port

N, SIDE, Q = 48, 32, 0.25
UNION = [0, 3, 5, 8, 13, 21, 22, 30, 34, 40, 41, 47]       # the logical batch; rank r takes UNION[r::2]
CLIP, SIGMA = 0.05, 2.0                                       # C small enough that clipping acts on most examples


def _dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(N, 1, SIDE, SIDE, generator=generator),
                         (torch.rand(N, len(LABELS), generator=generator) < 0.3).float())


def _private(engine: str, sigma: float) -> tuple[torch.nn.Module, object, object, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = create_model("micro")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = make_private(model, optimizer, _dataset(), mechanism=Mechanism(sigma, Q, int(1 / Q)), max_grad_norm=CLIP,
                      logical_batch=int(N * Q), accountant="prv", randomness=Randomness.secret(), engine=engine)
    return dp.model, dp.optimizer, dp.loader, before


def _step(engine: str, indices: list[int], sigma: float = 0.0) -> tuple[torch.Tensor, object]:
    """One logical step over ``indices`` (possibly none, as an empty Poisson draw); the flattened parameter update
    and the private loader."""
    model, optimizer, loader, before = _private(engine, sigma)
    x, y = _dataset().tensors
    chosen = torch.tensor(indices, dtype=torch.long)
    optimizer.zero_grad()
    losses = torch.nn.functional.binary_cross_entropy_with_logits(model(x[chosen]), y[chosen], reduction="none")
    losses.sum(dim=1).mean().backward()
    optimizer.step()
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    return update, loader


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for engine in ("samplers", "bk"):
            results[f"{engine}.exact"], loader = _step(engine, UNION[rank::2])
            results[f"{engine}.noise"], _ = _step(engine, [], SIGMA)
        sampler = loader.batch_sampler
        # A rate so small that ranks draw empty batches: every rank must still take every logical step.
        sparse = EveryStepSampler(total_size=N, sample_rate=0.01, generator=torch.Generator().manual_seed(rank))
        draws = [len(batch) for batch in sparse]
        results["meta"] = torch.tensor([type(sampler) is EveryStepSampler, sampler.sample_rate, len(loader),
                                        len(draws), draws.count(0), sparse.num_batches], dtype=torch.float64)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.mark.parametrize("engine", ["samplers", "bk"])
def test_a_distributed_step_equals_one_process_over_the_union_of_the_batches(two_ranks, engine):
    single, _ = _step(engine, UNION)
    for rank in two_ranks:
        assert (rank[f"{engine}.exact"] - single).abs().max() <= 1e-6
    assert single.abs().max() > 1e-3                     # the step moved the weights: the comparison means something


@pytest.mark.parametrize("engine", ["samplers", "bk"])
def test_the_noise_is_added_once_per_logical_step(two_ranks, engine):
    """With no examples, the averaged update is the noise alone: std sigma C / B, not sqrt(2) times that."""
    expected = SIGMA * CLIP / int(N * Q)
    first, second = (rank[f"{engine}.noise"] for rank in two_ranks)
    assert torch.equal(first, second)                    # both ranks apply the same (all-reduced) update
    assert float(first.std()) / expected == pytest.approx(1.0, abs=0.02)   # ~0.23 M draws: 0.3% standard error


def test_every_rank_takes_every_logical_step_at_the_single_process_rate(two_ranks):
    _, single_loader = _step("bk", [])
    for rank in two_ranks:
        is_every_step, rate, steps, drawn, empty, planned = rank["meta"].tolist()
        assert is_every_step and rate == single_loader.sample_rate == Q
        assert steps == len(single_loader) == int(1 / Q)
        assert drawn == planned == 100 and empty > 0     # empty draws are yielded, not skipped as Opacus does
    assert plan_mechanism(N, epsilon=8, delta=1e-5, epochs=2, logical_batch=int(N * Q), accountant="prv"
                          ).sample_rate == Q


KILLER = """
import os, signal, sys
from pathlib import Path
from models import privacy
from pipelines.config import load_params
from pipelines.train import train

calls = {"n": 0}
record = privacy.StepLedger.record
def record_then_die(self, *args):
    if calls["n"] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)     # rank 0 dies hard, mid-epoch; torchrun stops rank 1
    calls["n"] += 1
    record(self, *args)
privacy.StepLedger.record = record_then_die
train(load_params(Path("params.yaml"), sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_and_charges_every_ledger_step(private_workspace, tmp_path, monkeypatch):
    from models.privacy import StepLedger, epsilon_of
    from pipelines.config import load_params
    from pipelines.data.store import open_site
    from pipelines.train import train
    from tests.conftest import PRIVATE

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    overrides = ["base.image_size=32", "train.model=micro", "train.epochs=2", "train.logical_batch=64",
                 "train.physical_batch=32", "train.self_check_images=2", "train.epsilon=4", "train.processes=2"]
    p = load_params(Path("params.yaml"), overrides)
    out = Path("artifacts/train") / p.train.cell
    n = len(open_site(Path("artifacts/prepare") / PRIVATE.name).split("train")[0])
    planned = plan_mechanism(n, epsilon=4, delta=1e-5, epochs=2, logical_batch=64, accountant="prv")
    per_epoch = planned.steps // 2
    kill_at = per_epoch + per_epoch // 2                  # in the middle of epoch 2, after epoch 1's checkpoint
    (tmp_path / "killer.py").write_text(KILLER)
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(tmp_path / "killer.py"), str(kill_at), *overrides], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert killed.returncode != 0 and "rank      : 0" in killed.stderr and "SIGKILL" in killed.stderr, killed.stderr
    assert len((out / "ledger.jsonl").read_text().splitlines()) == kill_at
    assert json.loads((out / "checkpoint" / "state.json").read_text())["epoch"] == 1

    result = train(p, resume=True)                        # starts its two processes under torchrun again
    record = json.loads((out / "privacy.json").read_text())
    ledger = StepLedger(out / "ledger.jsonl").history()
    executed = sum(steps for _, _, steps in ledger)
    assert executed == record["steps"] == result["steps"] == kill_at + per_epoch   # epoch 2 ran again in full
    assert record["processes"] == 2 and record["n"] == n and record["sample_rate"] == planned.sample_rate
    assert record["noise_multiplier"] == pytest.approx(planned.noise_multiplier)
    assert record["epsilon"] == pytest.approx(epsilon_of(ledger, 1e-5, "prv"), rel=1e-9)


@pytest.mark.slow
def test_the_gpu_benchmark_refuses_a_machine_without_cuda_and_runs_its_code_path_on_the_cpu():
    benchmark = [sys.executable, str(Path(__file__).parents[2] / "benchmarks" / "gpu.py")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    if not torch.cuda.is_available():
        refused = subprocess.run(benchmark, capture_output=True, text=True, env=env)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.startswith("benchmarks/gpu.py: no CUDA device visible")
    ran = subprocess.run([*benchmark, "--cpu", "--rounds", "1"], capture_output=True, text=True, env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    lines = ran.stdout.splitlines()
    assert lines[0].startswith("device: CPU") and lines[2].split()[:2] == ["micro", "32"]
    assert float(lines[2].split()[-1].rstrip("x")) > 0                   # the DP/non-private ratio
    assert lines[3].startswith("peak memory, convnext_micro 32 px")
    assert lines[4].startswith("2-process DP step (gloo)") and float(lines[4].split()[-1]) <= 1e-6

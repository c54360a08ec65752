"""Opacus integration: making training private, accounting for it, and recording the guarantee.

- ``make_private``: Opacus DP-SGD with Poisson sampling only (``poisson_sampling=True``), the noise multiplier
  calibrated from the target epsilon over all planned steps, per-sample clipping in ``hooks`` mode on the exact
  samplers of ``models.per_sample`` or by the book-keeping engine of ``models.book_keeping``.
- ``cross_check``: the final epsilon recomputed independently with ``dp_accounting`` (PLD and RDP) from the
  accountant's (sigma, q, steps) history; a disagreement beyond the accountants' known slack is an error.
- ``StepLedger``: an append-only file with one line per logical step, written before the step runs, so a run
  killed between checkpoints still accounts for every step that touched private data.
- ``PrivacyRecord``: what is stored next to the weights and logged to MLflow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import opacus
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant, create_accountant
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import _mark_as_processed
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset

import models.per_sample  # noqa: F401  (registers the exact per-sample gradient samplers Opacus must use)

# Opacus' PRV accountant errs upwards by its eps_error (0.01); RDP order grids differ between the two libraries
# (dp_accounting drops fractional orders it cannot evaluate at large q). Measured gaps on this project's
# accounting tests: PRV 0.1-1.2% above PLD; RDP within 1.4e-4 relative at moderate epsilon and a
# few percent at epsilon near 40. Whatever the accountant, the reported epsilon may never be below PLD's.
PLD_SLACK_RELATIVE, PLD_SLACK_ABSOLUTE = 0.03, 0.02
RDP_SLACK_RELATIVE = 0.05
# dp_accounting's PLDAccountant default grid: the pessimistic PLD is an upper bound at any interval, this one tight.
PLD_INTERVAL = 1e-4


class PrivacyCheckError(RuntimeError):
    """The privacy accounting does not hold up; training must not release anything."""


class BoundedClipDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with per-sample clipping that provably stays within the bound C.

    Opacus computes the per-sample norms and clip factors in float32 as ``C / (norm + 1e-6)``; over millions of
    parameters the rounding leaves clipped norms up to about 1.2e-6 relative above C (measured on
    convnext_atto), i.e. above the sensitivity the noise is calibrated for. Here the per-parameter norms are
    combined and turned into factors in float64, and the factor is shrunk by 2^-16 (1.5e-5), far more than the
    float32 rounding of the per-parameter norms and of the scaled gradients.
    """

    SAFETY = 1 - 2.0**-16

    def clip_and_accumulate(self) -> None:
        """Clips every per-sample gradient to at most ``max_grad_norm`` and sums them into ``p.summed_grad``."""
        if len(self.grad_samples[0]) == 0:
            factor = torch.zeros((0,), dtype=torch.float64, device=self.grad_samples[0].device)
        else:
            norms = torch.stack([torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1) for g in self.grad_samples],
                                dim=1).double()
            factor = self.clip_factors(norms.pow(2).sum(dim=1), self.max_grad_norm)
        for p in self.params:
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factor.to(device=grad_sample.device, dtype=p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    @staticmethod
    def clip_factors(squared_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        """Per-example clip factors ``min(1, C / norm)`` in float64, shrunk by ``SAFETY`` (both engines use these).

        Args:
            squared_norms: each example's squared gradient norm over all parameters (float64).
            max_grad_norm: the clipping bound C.
        """
        norms = squared_norms.double().sqrt().clamp_min(1e-30)
        return (max_grad_norm / norms).clamp(max=1.0) * BoundedClipDPOptimizer.SAFETY


class DistributedBoundedClipDPOptimizer(BoundedClipDPOptimizer, DistributedDPOptimizer):
    """``BoundedClipDPOptimizer`` in a process group: Opacus' ``DistributedDPOptimizer`` noise and all-reduce.

    Each process clips and sums its own examples; rank 0 alone adds the noise (N(0, sigma^2 C^2) on its sum),
    each scales by its share of the expected batch (B / world size), and the all-reduce averages: the update is
    (sum of every clipped gradient + one noise draw) / B, exactly the single-process update.
    """


class EveryStepSampler(DistributedUniformWithReplacementSampler):
    """Opacus' distributed Poisson sampler, yielding an empty batch when a rank draws no example.

    Opacus' sampler skips a rank's empty draw, so that rank would take fewer logical steps than the others: its
    all-reduce would pair with another step's, or wait forever at the end. Here every rank yields exactly
    ``num_batches`` batches per epoch, empty or not (an empty one contributes a zero sum, and rank 0 its noise).
    """

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Each rank's Poisson draw over its shard at the global rate q, one per logical step."""
        if self.shuffle:
            order = torch.randperm(self.total_size, generator=torch.Generator().manual_seed(
                self.shuffle_seed + self.epoch))
        else:
            order = torch.arange(self.total_size)
        # The shard is public (a function of the index only); the draw inside it is this rank's secret.
        shard = order[self.rank:self.total_size:self.num_replicas]
        for _ in range(self.num_batches):
            yield shard[torch.rand(self.num_samples, generator=self.generator) < self.sample_rate]


@dataclass(frozen=True)
class PrivateTraining:
    """The private model, optimizer and Poisson loader, and the parameters that define the guarantee."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine
    noise_multiplier: float
    sample_rate: float


@dataclass(frozen=True)
class Mechanism:
    """The subsampled Gaussian mechanism a private run plans: noise multiplier, Poisson rate and steps."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def plan_mechanism(n: int, *, epsilon: float, delta: float, epochs: int, logical_batch: int,
                   accountant: str) -> Mechanism:
    """The mechanism Opacus' ``make_private_with_epsilon`` would plan for ``n`` units, found faster.

    q = 1 / (batches per epoch), steps = int(epochs / q), and the noise calibrated to ``epsilon`` over them.
    """
    sample_rate = 1 / math.ceil(n / min(logical_batch, n))
    steps = int(epochs / sample_rate)
    return Mechanism(calibrate_noise(epsilon, delta, sample_rate, steps, accountant), sample_rate, steps)


class Randomness:
    """The generators of everything random that touches the private data: Poisson sampling, noise, audit canaries.

    ``secret`` (every private run): a fresh 256-bit seed from the operating system's CSPRNG (``secrets``), from
    which SHA-256 derives the 64-bit seeds of dedicated ``torch.Generator`` (Mersenne Twister) objects, one per
    purpose (an audit's canaries, which are included and when each is sampled, have their own). The seed lives
    only in this constructor: it is never logged, printed, checkpointed or stored, and a resumed run draws a new
    one. ``public`` (``train.reproducible``): the same generators seeded from ``train.seed``, so a run can be
    repeated exactly; such a model has no DP guarantee against anyone who knows the seed (the config, the cell
    name and MLflow all show it). Each training process has its own: the ranks' Poisson draws over their shards
    must be independent (a public seed is extended by the rank), and only rank 0's noise generator is used.
    The noise generator lives on the device the gradients are on (torch draws CUDA noise from a CUDA generator).
    """

    def __init__(self, seed: bytes, kind: str, device: torch.device | str = "cpu") -> None:
        self.kind = kind
        self.sampling, self.canaries = (_derived_generator(seed, purpose) for purpose in (
            b"poisson-sampling", b"audit-canaries"))
        self.noise = _derived_generator(seed, b"noise", torch.device(device))

    @classmethod
    def secret(cls, device: torch.device | str = "cpu") -> Randomness:
        """Fresh secret randomness for one run (one process of it)."""
        return cls(secrets.token_bytes(32), "secret", device)

    @classmethod
    def public(cls, seed: int, rank: int = 0, device: torch.device | str = "cpu") -> Randomness:
        """Reproducible randomness from a known seed (no guarantee against whoever knows it)."""
        return cls(str(seed).encode() + (f"/rank-{rank}".encode() if rank else b""), "public", device)

    def describe(self) -> dict[str, str]:
        """What the privacy record and the model card say about it."""
        source = ("a fresh 256-bit seed from the OS CSPRNG (Python secrets), never stored" if self.kind == "secret"
                  else "train.seed (train.reproducible: true): public, no DP guarantee against whoever knows it")
        return {"noise_seed": self.kind,
                "noise_generator": f"torch.Generator (mt19937), one each for Poisson sampling and Gaussian noise "
                                   f"(in every training process), seeded by SHA-256 from {source}"}


def _derived_generator(seed: bytes, purpose: bytes, device: torch.device | None = None) -> torch.Generator:
    generator = torch.Generator(device=device or torch.device("cpu"))
    return generator.manual_seed(int.from_bytes(hashlib.sha256(seed + purpose).digest()[:8], "big"))


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset, *, mechanism: Mechanism,
                 max_grad_norm: float, logical_batch: int, accountant: str, randomness: Randomness,
                 engine: str = "samplers") -> PrivateTraining:
    """Wraps model, optimizer and data for DP-SGD with the planned mechanism and the run's own generators.

    ``engine`` says how the clipped per-sample gradient sums are made: ``samplers`` (Opacus hooks materialise every
    per-sample gradient with the exact samplers of ``models.per_sample``) or ``bk`` (``models.book_keeping``: no
    parameter gradient from autograd, ghost norms where cheaper, the clipped sum from the records).

    In a ``torch.distributed`` process group (``torchrun``) the model is wrapped in Opacus' ``DPDDP`` (rank 0's
    weights broadcast to all), so Opacus builds its distributed Poisson loader (each rank samples its shard at the
    global rate q; here it never skips a step, see ``EveryStepSampler``) and its ``DistributedDPOptimizer`` (noise
    once, on rank 0; gradients averaged). sigma, q, the steps and so epsilon are those of one process.

    Raises:
        PrivacyCheckError: the loader does not sample by Poisson at the planned rate.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    privacy_engine = PrivacyEngine(accountant=accountant, secure_mode=False)
    # The DataLoader's generator becomes the Poisson sampler's; the noise has its own.
    loader = DataLoader(dataset, batch_size=min(logical_batch, len(dataset)), generator=randomness.sampling,
                        pin_memory=randomness.noise.device.type == "cuda")
    private_model, private_optimizer, private_loader = privacy_engine.make_private(
        module=DPDDP(model) if distributed else model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=mechanism.noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
        grad_sample_mode="hooks", noise_generator=randomness.noise)
    # Same object, same Opacus wiring (accountant hook, noise, skip queue); only the clipping is replaced.
    private_optimizer.__class__ = DistributedBoundedClipDPOptimizer if distributed else BoundedClipDPOptimizer
    if engine == "bk":
        from models.book_keeping import BookKeeping, BookKeepingDPOptimizer, DistributedBookKeepingDPOptimizer

        private_model.remove_hooks()        # no per-sample gradients: the book-keeping records replace them
        private_optimizer.__class__ = DistributedBookKeepingDPOptimizer if distributed else BookKeepingDPOptimizer
        private_optimizer.book = BookKeeping(model)
    elif engine != "samplers":
        raise ValueError(f"unknown DP engine {engine!r}; use samplers or bk")
    sampler = private_loader.batch_sampler
    if distributed and type(sampler) is DistributedUniformWithReplacementSampler:
        sampler.__class__ = EveryStepSampler
    expected = EveryStepSampler if distributed else opacus.utils.uniform_sampler.UniformWithReplacementSampler
    if type(sampler) is not expected:
        raise PrivacyCheckError(f"the training loader samples with {type(sampler).__name__}, not Poisson sampling")
    if (sampler.sample_rate != mechanism.sample_rate or sampler.generator is not randomness.sampling
            or private_optimizer.generator is not randomness.noise):
        raise PrivacyCheckError("the sampler and the noise must use the planned rate and the run's own generators")
    return PrivateTraining(private_model, private_optimizer, private_loader, privacy_engine,
                           float(private_optimizer.noise_multiplier), float(sampler.sample_rate))


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                    tolerance: float = 0.01) -> float:
    """The noise multiplier of ``get_noise_multiplier``'s contract, found with fewer accountant calls.

    Its epsilon (by ``accountant``, after ``steps``) is at most ``epsilon`` and within ``tolerance`` of it.
    Opacus bisects sigma from [0, 10], about 20 accountant calls; one PRV call costs about 0.7 s here. Epsilon is
    smooth and decreasing in sigma, so a bracketing regula falsi (Illinois) on (log sigma, log epsilon) gets there
    in about six. The answer always lies on the private side: epsilon(sigma) <= target.

    Raises:
        ValueError: no noise multiplier up to 1e6 reaches the target.
    """
    counter = create_accountant(mechanism=accountant)

    def epsilon_at(log_sigma: float) -> float:
        counter.history = [(math.exp(log_sigma), sample_rate, steps)]
        return float(counter.get_epsilon(delta=delta))

    def gap(eps: float) -> float:
        return math.log(eps) - math.log(epsilon)

    # Bracket: at lo the epsilon is above the target, at hi at or below it (compared exactly, not in logs).
    lo = hi = 0.0
    eps_lo = eps_hi = epsilon_at(0.0)
    while eps_hi > epsilon:
        lo, eps_lo, hi = hi, eps_hi, hi + math.log(2)
        if hi > math.log(1e6):
            raise ValueError(f"no noise multiplier reaches epsilon {epsilon:g} at delta {delta:g}: raise the budget")
        eps_hi = epsilon_at(hi)
    while eps_lo <= epsilon:
        hi, eps_hi, lo = lo, eps_lo, lo - math.log(2)
        eps_lo = epsilon_at(lo)
    f_lo, f_hi, side = gap(eps_lo), gap(eps_hi), 0
    while epsilon - eps_hi > tolerance:
        x = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        eps = epsilon_at(x)
        if eps > epsilon:
            lo, eps_lo, f_lo = x, eps, gap(eps)
            f_hi = f_hi / 2 if side == -1 else f_hi     # Illinois: halve the stale end so it cannot stall
            side = -1
        else:
            hi, eps_hi, f_hi = x, eps, gap(eps)
            f_lo = f_lo / 2 if side == 1 else f_lo
            side = 1
    return math.exp(hi)


def ends_logical_step(optimizer: DPOptimizer) -> bool:
    """Whether the coming ``optimizer.step()`` completes a logical step (clips, adds noise and updates).

    Under BatchMemoryManager the physical batches before the last one of a logical batch only accumulate;
    Opacus queues that decision, and this reads it without consuming it.
    """
    queue = optimizer._step_skip_queue
    return not (queue and queue[0])


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """The epsilon of an accountant history under Opacus' accountant of that name."""
    engine = PrivacyEngine(accountant=accountant)
    engine.accountant.history = [tuple(entry) for entry in history]
    return float(engine.accountant.get_epsilon(delta))


def pld_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """The PLD epsilon of a composition of Poisson-subsampled Gaussian segments, as ``dp_accounting`` computes it.

    The same numbers as composing the events with ``dp_accounting.pld.PLDAccountant`` (pessimistic, interval
    1e-4, add/remove one), but each segment's one-step distribution is built once per process: building it is
    the expensive part (seconds), composing it is cheap, and a run asks for the same (sigma, q) again and again.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld

    composed = pld.identity(value_discretization_interval=PLD_INTERVAL)
    for sigma, q, steps in history:
        if q == 0 or steps == 0:
            continue
        if sigma == 0:
            return math.inf
        composed = composed.compose(_subsampled_gaussian_pld(float(sigma), float(q)).self_compose(int(steps)))
    return float(composed.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=64)
def _subsampled_gaussian_pld(sigma: float, sample_rate: float):
    from dp_accounting.pld import privacy_loss_distribution as pld

    return pld.from_gaussian_mechanism(standard_deviation=sigma, value_discretization_interval=PLD_INTERVAL,
                                       sampling_prob=sample_rate)


def dp_accounting_epsilons(history: list[tuple[float, float, int]], delta: float) -> dict[str, float]:
    """Epsilon of the same Poisson-subsampled Gaussian compositions by ``dp_accounting`` (PLD and RDP)."""
    from dp_accounting import dp_event, rdp

    # Fractional RDP orders that fail to converge at large q are dropped with a warning each; that is expected.
    logging.getLogger("absl").setLevel(logging.ERROR)
    events = [dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)),
                                           int(steps)) for sigma, q, steps in history]
    rdp_accountant = rdp.RdpAccountant(list(RDPAccountant.DEFAULT_ALPHAS))
    rdp_accountant.compose(dp_event.ComposedDpEvent(events))
    return {"pld": pld_epsilon(history, delta), "rdp": float(rdp_accountant.get_epsilon(delta))}


def cross_check(history: list[tuple[float, float, int]], delta: float, accountant: str) -> dict[str, float]:
    """Recomputes epsilon independently and compares it with the reported one.

    Returns:
        ``{"reported": ..., "pld": ..., "rdp": ...}``.

    Raises:
        PrivacyCheckError: the reported epsilon is below dp_accounting's PLD epsilon (it would overstate
            privacy) or further above it than the PRV slack; or RDP disagrees beyond the order-grid slack.
    """
    reported = epsilon_of(history, delta, accountant)
    independent = dp_accounting_epsilons(history, delta)
    if reported < independent["pld"] - 1e-3:
        raise PrivacyCheckError(f"Opacus {accountant} epsilon {reported:.6f} is below the tight dp_accounting PLD "
                                f"epsilon {independent['pld']:.6f}: it would overstate the privacy")
    if accountant == "rdp":
        if abs(reported - independent["rdp"]) > RDP_SLACK_RELATIVE * independent["rdp"] + 1e-6:
            raise PrivacyCheckError(f"Opacus RDP epsilon {reported:.6f} disagrees with dp_accounting RDP "
                                    f"{independent['rdp']:.6f}")
    elif reported > independent["pld"] * (1 + PLD_SLACK_RELATIVE) + PLD_SLACK_ABSOLUTE:
        raise PrivacyCheckError(f"Opacus {accountant} epsilon {reported:.6f} is far above dp_accounting PLD "
                                f"{independent['pld']:.6f}: the accountants disagree")
    return {"reported": reported, **independent}


class StepLedger:
    """Append-only count of logical DP steps, one JSON line per step written (and flushed) before it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, sigma: float, sample_rate: float) -> None:
        """Records that one more step with (sigma, q) is about to touch the private data."""
        with self.path.open("a") as handle:
            handle.write(json.dumps({"sigma": sigma, "q": sample_rate}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def steps(self) -> int:
        """Steps recorded so far."""
        return sum(n for _, _, n in self.history())

    def history(self) -> list[tuple[float, float, int]]:
        """The recorded steps as (sigma, q, steps) segments, each charged with its own mechanism."""
        segments: list[tuple[float, float, int]] = []
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        for entry in (json.loads(line) for line in lines if line.strip()):
            mechanism = (float(entry["sigma"]), float(entry["q"]))
            if segments and segments[-1][:2] == mechanism:
                segments[-1] = (*mechanism, segments[-1][2] + 1)
            else:
                segments.append((*mechanism, 1))
        return segments


@dataclass(frozen=True)
class PrivacyRecord:
    """The guarantee of a trained model, stored as ``privacy.json`` next to its weights.

    ``epsilon`` is ``inf`` (``"inf"`` in JSON) for the non-private baseline, with sigma, q and steps still
    describing the sampling. ``history`` lists the (sigma, q, steps) segments the run charged (its step ledger);
    ``data_set_epsilon`` is what every private run recorded on the same data set composes to, this one included.
    """

    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    epochs: int
    max_grad_norm: float
    unit: str
    n: int
    epsilon_pld: float
    epsilon_rdp: float
    history: list[list[float]]
    opacus_version: str
    torch_version: str
    noise_seed: str
    noise_generator: str
    data_version: str
    prepare_digest: str
    data_set: str
    data_set_epsilon: float
    init: dict[str, str]
    engine: str             # how the clipped sums were made (samplers | bk; none without DP): same guarantee
    processes: int          # how many processes trained (torchrun, Opacus DPDDP): same guarantee

    def to_json(self) -> str:
        """JSON with infinities written as the string ``"inf"``."""
        return json.dumps({k: json_value(v) for k, v in asdict(self).items()}, indent=2)


def json_value(value: object) -> object:
    """A value as the project's JSON records hold it: infinity as the string ``"inf"`` (JSON has no infinity)."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value

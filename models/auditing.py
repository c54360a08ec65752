"""Empirical lower bounds on epsilon from one training run with canaries (privacy auditing).

A DP guarantee is an upper bound proven from the mechanism; an audit measures a lower bound from what a trained
model reveals. m canaries are each included independently with probability 1/2; after training, every canary
gets a score (higher: more likely included). An attacker guesses "in" for the k+ highest scores and "out" for
the k- lowest and abstains on the rest. Under (epsilon, delta)-DP the number of correct guesses cannot be much
better than randomized response at accuracy e^eps / (1 + e^eps), which yields a p-value for each epsilon:

- ``one_run_epsilon``: the largest epsilon the guesses reject at significance alpha, by the one-run test of
  Steinke, Nasr & Jagielski (NeurIPS 2023), with the p-value and the search of JAX-Privacy's ``auditing``
  module (``_one_run_p_value``, ``_epsilon_one_run``).
- ``one_run_epsilon_fdp``: the tighter test of Mahloujifar, Melis & Chaudhuri (ICML 2025, "Auditing f-differential
  privacy in one run"), against the Gaussian trade-off curve of each (epsilon, delta), as JAX-Privacy's
  ``_epsilon_one_run_fdp``.
- ``audit_scores``: scores -> guesses -> both bounds. k+ = k- = k runs over a fixed grid of guess counts and
  the significance is split over the grid (Bonferroni), so choosing the best k after seeing the scores is paid for.

A lower bound is evidence, not a proof: a bound above the claimed epsilon shows the implementation leaks more than
it claims; a bound below it shows nothing more than that this attack did not find a leak.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import optimize, special, stats

from models.convnext import normalize


def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability, under (epsilon, delta)-DP, of at least ``correct`` right among ``guesses`` guesses.

    Args:
        m: canaries (included or not).
        guesses: guesses made (the rest abstain).
        correct: right guesses.
        epsilon: the DP claim tested.
        delta: its delta.
    """
    q = special.expit(epsilon)
    beta = stats.binom.sf(correct - 1, guesses, q)
    if delta == 0:
        return float(beta)
    steps = np.arange(1, correct + 1)
    alpha = np.max((stats.binom.sf(correct - steps - 1, guesses, q) - beta) / steps, initial=0)
    return float(min(beta + alpha * delta * 2 * m, 1))


def one_run_epsilon(m: int, guesses: int, correct: int, significance: float, delta: float,
                    floor: float = 0.0) -> float:
    """The largest epsilon whose (epsilon, delta) claim the guesses reject at ``significance`` (Steinke et al.).

    Returns ``floor`` when no claim above it is rejected.
    """
    if one_run_p_value(m, guesses, correct, floor, 0) > significance:
        return floor        # even delta = 0 is not rejected at the floor: nothing larger is

    def rejected_by(epsilon: float) -> float:
        return significance - one_run_p_value(m, guesses, correct, epsilon, delta)

    return _largest_rejected(rejected_by, floor)


def one_run_epsilon_fdp(m: int, guesses: int, correct: int, significance: float, delta: float,
                        floor: float = 0.0) -> float:
    """The largest epsilon whose Gaussian trade-off curve at (epsilon, delta) the guesses reject (Mahloujifar et al.).

    Returns ``floor`` when no claim above it is rejected.
    """
    def rejected_by(epsilon: float) -> float:
        # The capped (r, h) recursion of the paper ('audit_rh_with_cap'): positive when the claim is rejected.
        inverse = _gaussian_blow_up_inverse(epsilon, delta)
        r = significance * correct / m
        h = significance * (guesses - correct) / m
        for i in range(correct - 1, -1, -1):
            h_new = max(h, inverse(r))
            if h_new == h:
                break       # neither h nor r changes again
            r, h = min(r + i / (guesses - i) * (h_new - h), 1.0), h_new
        return r + h - guesses / m

    return _largest_rejected(rejected_by, floor)


def _largest_rejected(rejected_by: Callable[[float], float], floor: float) -> float:
    """The root of a decreasing ``rejected_by`` above ``floor`` (doubling, then Brent), or ``floor``."""
    if rejected_by(floor) <= 0:
        return floor
    low, high = floor, max(1.0, 2 * floor)
    while rejected_by(high) > 0:
        low, high = high, high * 2
    return float(optimize.brentq(rejected_by, low, high, xtol=1e-6))


@functools.lru_cache(maxsize=1024)
def _gaussian_blow_up_inverse(epsilon: float, delta: float) -> Callable[[float], float]:
    """The inverse trade-off of the Gaussian mechanism that is exactly (epsilon, delta)-DP."""
    import dp_accounting

    sigma = dp_accounting.get_sigma_gaussian(epsilon, delta)
    if sigma == 0:
        return lambda x: float(x == 1.0)
    mu = 1 / sigma
    return lambda x: float(special.ndtr(special.ndtri(x) - mu))


@dataclass(frozen=True)
class AuditResult:
    """What one canary audit found: the guesses behind each bound and the bounds themselves."""

    m: int
    included: int
    significance: float
    delta: float
    guess_grid: tuple[int, ...]
    guesses: int
    correct: int
    epsilon_lower: float
    guesses_fdp: int
    correct_fdp: int
    epsilon_lower_fdp: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return {**asdict(self), "guess_grid": list(self.guess_grid)}


def guess_grid(m: int, points: int = 12) -> tuple[int, ...]:
    """Guess counts per side to try: geometric from 1 to m/2 (fixed before any score is seen)."""
    return tuple(sorted({max(1, int(round(k))) for k in np.geomspace(1, m // 2, points)}))


def audit_scores(scores: Sequence[float], included: Sequence[bool], significance: float, delta: float,
                 grid: Sequence[int] | None = None) -> AuditResult:
    """Both one-run lower bounds from canary scores: k+ = k- = k guesses per side, the best k over ``grid``.

    Args:
        scores: one score per canary, higher meaning "more likely included".
        included: whether each canary was included (the secret the attacker guesses).
        significance: 1 - confidence (0.05 for 95%), split evenly over the grid (Bonferroni).
        delta: the claimed delta.
        grid: guess counts per side; default ``guess_grid(m)``.
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError("scores and included must be one-dimensional and of the same length")
    m = len(scores)
    grid = tuple(grid) if grid is not None else guess_grid(m)
    if not grid or max(grid) > m // 2:
        raise ValueError(f"guess counts per side must be between 1 and m/2 = {m // 2}")
    # Ties broken at random would leak nothing; a stable order keeps the audit reproducible from its scores.
    order = np.argsort(scores, kind="stable")
    per_test = significance / len(grid)
    best = {"steinke": (0.0, 0, 0), "fdp": (0.0, 0, 0)}
    for k in grid:
        correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
        guesses = 2 * k
        steinke = one_run_epsilon(m, guesses, correct, per_test, delta, floor=best["steinke"][0])
        if steinke > best["steinke"][0]:
            best["steinke"] = (steinke, guesses, correct)
        fdp = one_run_epsilon_fdp(m, guesses, correct, per_test, delta, floor=best["fdp"][0])
        if fdp > best["fdp"][0]:
            best["fdp"] = (fdp, guesses, correct)
    (eps, guesses, correct), (eps_fdp, guesses_fdp, correct_fdp) = best["steinke"], best["fdp"]
    return AuditResult(m=m, included=int(included.sum()), significance=significance, delta=delta,
                       guess_grid=grid, guesses=guesses, correct=correct, epsilon_lower=eps,
                       guesses_fdp=guesses_fdp, correct_fdp=correct_fdp, epsilon_lower_fdp=eps_fdp)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon at ``delta`` of the Gaussian mechanism with sensitivity 1 and noise ``sigma``."""
    import dp_accounting

    return math.inf if sigma == 0 else float(dp_accounting.get_epsilon_gaussian(sigma, delta))


class _Canaries:
    """What both canary kinds share: inclusion (probability 1/2), Poisson sampling at q, one score each.

    Inclusion and sampling are drawn from the audit's secret ``generator``.
    """

    def __init__(self, m: int, sample_rate: float, generator: torch.Generator) -> None:
        self.m, self.sample_rate, self.generator = m, sample_rate, generator
        self.included = torch.rand(m, generator=generator) < 0.5
        self.sampled = torch.zeros(m, dtype=torch.int64)
        self.scores = torch.zeros(m, dtype=torch.float64)

    def draw(self) -> torch.Tensor:
        """The canaries this logical step samples (included ones, each with probability q)."""
        chosen = self.included & (torch.rand(self.m, generator=self.generator) < self.sample_rate)
        step = torch.nonzero(chosen).flatten()
        self.sampled[step] += 1
        return step


class GradientCanaries(_Canaries):
    """White-box Dirac gradient canaries for one DP-SGD run (Steinke, Nasr & Jagielski 2023; Nasr et al. 2023).

    Canary i owns one coordinate of the model's parameters. Each canary is included with probability 1/2, and an
    included canary is Poisson-sampled at every logical step with the run's own rate q, like any unit; a sampled
    canary is one more per-sample gradient, zero everywhere but ``magnitude`` (above the clipping bound) on its
    coordinate, clipped by the optimizer's own ``clip_and_accumulate`` and noised with the step's examples. Its
    score is the sum over steps of the released noisy gradient at its coordinate: what an adversary who sees
    every iterate sees. Inclusion and sampling come from ``generator`` (secret: the audit's own), and only the
    audit output holds them.

    The canaries are clipped in a pass of their own, over a vector of one coordinate per canary: a canary's norm
    is that of its one non-zero coordinate wherever that coordinate lives, so the clipped values are the ones a
    full-size canary row would get, without materialising rows of millions of zeros for every parameter.
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], m: int, magnitude: float, sample_rate: float,
                 generator: torch.Generator) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        sizes = torch.tensor([p.numel() for p in self.parameters])
        if m > int(sizes.sum()):
            raise ValueError(f"{m} canaries need {m} parameter coordinates; the model has {int(sizes.sum())}")
        super().__init__(m, sample_rate, generator)
        self.magnitude = magnitude
        # m distinct coordinates, uniformly, without a permutation of every parameter (8 bytes each).
        flat = torch.empty(0, dtype=torch.int64)
        while len(flat) < m:
            flat = torch.unique(torch.cat([flat, torch.randint(int(sizes.sum()), (m - len(flat),),
                                                               generator=generator)]))
        # unique() sorts: shuffle, so a canary's index says nothing about where its coordinate lives.
        flat = flat[torch.randperm(m, generator=generator)]
        starts = torch.cumsum(sizes, 0) - sizes
        self.owner = torch.searchsorted(torch.cumsum(sizes, 0), flat, right=True)
        self.coordinate = flat - starts[self.owner]
        self._owned = [(index, torch.nonzero(self.owner == index).flatten()) for index in range(len(self.parameters))
                       if bool((self.owner == index).any())]
        self._clipper: tuple[torch.nn.Parameter, object] | None = None

    def add_clipped(self, optimizer: object) -> None:
        """Adds this step's canaries, clipped by ``optimizer``'s own clipping, to the sums its noise is added to.

        Call before the ``step()`` that ends a logical batch: the canaries then share that step's noise.
        """
        chosen = self.draw()
        shadow, clipper = self._clipper_like(optimizer)
        rows = torch.zeros((len(chosen), self.m), dtype=shadow.dtype)
        rows[torch.arange(len(chosen)), chosen] = self.magnitude
        shadow.grad_sample, shadow.summed_grad = rows, None
        clipper.clip_and_accumulate()
        clipped = shadow.summed_grad
        for index, mine in self._owned:
            p = self.parameters[index]
            if not bool(clipped[mine].any()):
                continue
            added = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            added.index_add_(0, self.coordinate[mine].to(p.device), clipped[mine].to(p.device, p.dtype))
            added = added.view_as(p)
            p.summed_grad = added if p.summed_grad is None else p.summed_grad + added

    def _clipper_like(self, optimizer: object) -> tuple[torch.nn.Parameter, object]:
        """An optimizer of ``optimizer``'s class and clipping bound over one coordinate per canary."""
        if self._clipper is None:
            shadow = torch.nn.Parameter(torch.zeros(self.m))
            clipper = type(optimizer)(torch.optim.SGD([shadow], lr=0.0), noise_multiplier=0.0,
                                      max_grad_norm=optimizer.max_grad_norm, expected_batch_size=1)
            self._clipper = shadow, clipper
        return self._clipper

    def add_to_gradient(self, scale: float) -> None:
        """Adds this step's canaries to the summed gradient of a non-private step (no clipping, no noise)."""
        step = torch.zeros(self.m, dtype=torch.bool)
        step[self.draw()] = True
        for index, mine in self._owned:
            p, mine = self.parameters[index], mine[step[mine]]
            p.grad.view(-1).index_add_(0, self.coordinate[mine].to(p.device),
                                       torch.full((len(mine),), self.magnitude * scale, dtype=p.grad.dtype,
                                                  device=p.device))

    def observe(self) -> None:
        """Adds the released gradient at each canary's coordinate to its score (after the optimizer's step)."""
        for index, mine in self._owned:
            p = self.parameters[index]
            self.scores[mine] += p.grad.detach().view(-1)[self.coordinate[mine].to(p.device)].double().cpu()


class InputCanaries(_Canaries):
    """Black-box input canaries: real-looking images with flipped labels, scored by the trained model's loss.

    Each canary is included with probability 1/2 and an included canary is Poisson-sampled at every logical
    step with the run's rate q, like any unit: a sampled canary joins that step's batch as one more example, so
    it gets its per-sample gradient, clipping and noise from the training code itself. After training, its
    score is minus the model's loss on it (an included canary the model fitted has a low loss): what anyone
    who can query the final model sees. The images are public (never private ones) and carry every label
    flipped, so only memorising the canary itself can fit it. Inclusion and sampling come from ``generator``.
    Canaries are not augmented.

    Args:
        images: uint8 (m, S, S), preprocessed like the training images.
        labels: (m, L) 0/1 true labels (the canaries carry them flipped).
        sample_rate: the run's Poisson rate q.
        generator: the audit's secret generator.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, sample_rate: float, generator: torch.Generator
                 ) -> None:
        super().__init__(len(images), sample_rate, generator)
        self.images = normalize(torch.from_numpy(np.ascontiguousarray(images)))
        self.labels = 1 - torch.as_tensor(labels, dtype=torch.float32)

    def join(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with this step's sampled canaries appended (included ones, each with probability q)."""
        chosen = self.draw()
        return torch.cat([x, self.images[chosen].to(x.device, x.dtype)]), torch.cat([y, self.labels[chosen].to(y)])

    def score(self, model: torch.nn.Module, batch_size: int = 256) -> None:
        """Scores every canary by minus the model's loss on it (eval mode, no gradients)."""
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for start in range(0, self.m, batch_size):
                logits = model(self.images[start:start + batch_size])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, self.labels[start:start + batch_size], reduction="none").sum(dim=1)
                self.scores[start:start + batch_size] = -loss.double()
        model.train(was_training)

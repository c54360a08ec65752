"""Accounting: Opacus' upstream reference values, the dp_accounting cross-check, Poisson sampling, empty steps."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import TensorDataset

from models.convnext import create_model
from models.privacy import (
    PrivacyCheckError,
    Randomness,
    cross_check,
    dp_accounting_epsilons,
    ends_logical_step,
    epsilon_of,
    make_private,
    plan_mechanism,
    pld_epsilon,
)


def test_opacus_upstream_reference_values():
    # opacus/tests/accountants_test.py: sigma 1.5, q 0.04, delta 1e-5 (the PRV and GDP tests step int(90 // 0.04)).
    assert epsilon_of([(1.5, 0.04, 2250)], 1e-5, "rdp") == pytest.approx(7.32911117143, abs=1e-7)
    assert epsilon_of([(1.5, 0.04, 2249)], 1e-5, "prv") == pytest.approx(6.777395712150674, abs=1e-6)
    assert 6.59 < epsilon_of([(1.5, 0.04, 2249)], 1e-5, "gdp") < 6.6
    assert get_noise_multiplier(target_epsilon=8, target_delta=1e-5, sample_rate=0.04, epochs=90,
                                accountant="rdp") == pytest.approx(1.416, abs=1e-4)
    assert get_noise_multiplier(target_epsilon=8, target_delta=1e-5, sample_rate=0.04, epochs=90,
                                accountant="prv") == pytest.approx(1.34765625, abs=1e-6)


@pytest.mark.parametrize("sigma", [0.6, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("q", [1e-3, 1e-2, 0.05])
@pytest.mark.parametrize("steps", [100, 1000])
def test_reported_epsilon_agrees_with_dp_accounting(sigma, q, steps):
    history = [(sigma, q, steps)]
    checked = cross_check(history, 1e-5, "prv")
    assert checked["reported"] >= checked["pld"] - 1e-3          # never more optimistic than PLD
    assert checked["reported"] <= checked["rdp"] * 1.02          # and never looser than RDP
    assert cross_check(history, 1e-5, "rdp")["reported"] == pytest.approx(checked["rdp"], rel=0.05)


def test_an_accountant_that_understates_epsilon_is_refused():
    # GDP (a CLT approximation) reports less than the tight PLD bound here: the cross-check must refuse it.
    history = [(1.5, 0.04, 2249)]
    assert epsilon_of(history, 1e-5, "gdp") < dp_accounting_epsilons(history, 1e-5)["pld"]
    with pytest.raises(PrivacyCheckError, match="below the tight dp_accounting PLD"):
        cross_check(history, 1e-5, "gdp")


@pytest.mark.parametrize("history", [[(0.91, 1 / 7, 42)], [(0.91, 1 / 7, 42), (1.8, 0.05, 100), (0.91, 1 / 7, 3)],
                                     [(2.0, 0.01, 1000), (0.0, 0.0, 5)]])
def test_cached_pld_composition_is_dp_accountings_own(history):
    from dp_accounting import dp_event, pld

    accountant = pld.PLDAccountant()
    accountant.compose(dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps) for sigma, q, steps in history]))
    assert pld_epsilon(history, 1e-5) == accountant.get_epsilon(1e-5)
    assert pld_epsilon(history, 1e-5) == accountant.get_epsilon(1e-5)        # again, from the cache
    assert pld_epsilon([*history, (0.0, 0.1, 1)], 1e-5) == math.inf          # a step without noise


def test_heterogeneous_history_composes():
    one = cross_check([(1.0, 0.05, 300)], 1e-5, "prv")["reported"]
    two = cross_check([(1.0, 0.05, 300), (1.0, 0.05, 20)], 1e-5, "prv")["reported"]
    assert two > one


def tiny_private(n, logical_batch, epsilon=8.0, epochs=1, seed=3):
    torch.manual_seed(seed)
    dataset = TensorDataset(torch.randn(n, 1, 32, 32), (torch.rand(n, 5) > 0.5).float())
    model = create_model("atto")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    mechanism = plan_mechanism(n, epsilon=epsilon, delta=1e-5, epochs=epochs, logical_batch=logical_batch,
                               accountant="prv")
    return make_private(model, optimizer, dataset, mechanism=mechanism, max_grad_norm=1.0,
                        logical_batch=logical_batch, accountant="prv", randomness=Randomness.secret())


def test_poisson_batches_vary_and_every_logical_step_is_counted_empty_ones_included():
    # q = 1/60 over 60 steps: about 37% of logical batches are empty, so none at all has odds ~1e-12 (the draw is
    # secret: at q = 1/30 over 30 steps one run in 70 saw no empty batch and failed).
    dp = tiny_private(n=60, logical_batch=1)
    sizes = []
    with BatchMemoryManager(data_loader=dp.loader, max_physical_batch_size=4, optimizer=dp.optimizer) as batches:
        for x, y in batches:
            logical_end = ends_logical_step(dp.optimizer)
            dp.optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(dp.model(x), y, reduction="none").sum(1).mean().backward()
            dp.optimizer.step()
            if logical_end:
                sizes.append(len(x))
    assert dp.sample_rate == pytest.approx(1 / 60)
    steps = sum(entry[2] for entry in dp.engine.accountant.history)
    assert steps == len(dp.loader) == 60                           # logical steps, not physical batches
    assert 0 in sizes and len(set(sizes)) > 1                       # empty steps happened, sizes vary
    assert dp.engine.accountant.history == [(dp.noise_multiplier, dp.sample_rate, 60)]


def test_poisson_sampler_draws_independent_bernoulli_batches():
    dp = tiny_private(n=1000, logical_batch=50)            # q = 0.05
    sampler = dp.loader.batch_sampler
    draws = [set(batch) for _, batch in zip(range(2000), _forever(sampler), strict=False)]
    sizes = np.array([len(d) for d in draws])
    q = sampler.sample_rate
    assert abs(sizes.mean() - 1000 * q) < 4 * math.sqrt(1000 * q * (1 - q) / len(draws))
    assert abs(sizes.var() / (1000 * q * (1 - q)) - 1) < 0.15      # Binomial(N, q) spread, not a fixed size
    both = np.mean([(0 in d) and (1 in d) for d in draws])
    assert abs(both - q * q) < 3 * math.sqrt(q * q * (1 - q * q) / len(draws)) + 1e-3


def _forever(sampler):
    while True:
        yield from sampler


def test_noise_is_calibrated_to_the_target_over_the_planned_steps():
    dp = tiny_private(n=200, logical_batch=20, epsilon=3.0, epochs=4)
    planned = [(dp.noise_multiplier, dp.sample_rate, 4 * len(dp.loader))]
    assert epsilon_of(planned, 1e-5, "prv") <= 3.0
    assert epsilon_of(planned, 1e-5, "prv") > 2.9                     # not needlessly noisy either


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("epsilon, q, steps", [(8.0, 1 / 7, 42), (1.0, 0.01, 300), (3.0, 0.3, 5)])
def test_calibrated_noise_reaches_the_target_from_the_private_side(accountant, epsilon, q, steps):
    """The faster search keeps Opacus' contract: epsilon(sigma) <= target, within 0.01 of it, and about Opacus' sigma."""
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    from models.privacy import calibrate_noise

    sigma = calibrate_noise(epsilon, 1e-5, q, steps, accountant)
    counter = create_accountant(accountant)
    counter.history = [(sigma, q, steps)]
    assert epsilon - 0.01 <= counter.get_epsilon(1e-5) <= epsilon
    opacus_sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=1e-5, sample_rate=q, steps=steps,
                                        accountant=accountant)
    assert sigma == pytest.approx(opacus_sigma, rel=0.02)

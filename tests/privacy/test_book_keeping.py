"""The book-keeping engine is exact: per-example norms and clipped sums equal a per-example autograd loop's, clipped
contributions stay within the bound, an empty Poisson batch still gets its noise, and the self-check catches a
wrong rule."""

import pytest
import torch
from torch import nn

from models import book_keeping
from models.book_keeping import BookKeeping, BookKeepingDPOptimizer, max_relative_error
from models.convnext import create_model
from models.privacy import BoundedClipDPOptimizer
from tests.privacy import DEVICE

EXACT = 1e-5


def batch(n=4, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, size, size, generator=generator).to(DEVICE),
            (torch.rand(n, 5, generator=generator) > 0.5).float().to(DEVICE))


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("size", ["atto", "femto", "nano", "tiny"])
def test_norms_and_clipped_sums_equal_a_per_example_loop(size, image_size):
    torch.manual_seed(0)
    assert max_relative_error(create_model(size).to(DEVICE), *batch(size=image_size)) <= EXACT


@pytest.mark.parametrize("ghost", [True, False])
def test_both_norm_routes_are_exact_on_every_dense_layer(monkeypatch, ghost):
    """Forcing every Linear and dense Conv2d through one route (ghost norm, or materialised per-sample gradient)."""
    monkeypatch.setattr(book_keeping, "prefers_ghost", lambda tokens, fan_in, fan_out: ghost)
    torch.manual_seed(0)
    assert max_relative_error(create_model("atto").to(DEVICE), *batch(size=64)) <= EXACT


def test_the_cost_model_picks_ghost_norms_for_few_tokens_and_many_channels():
    assert book_keeping.prefers_ghost(4, 320, 1280) and book_keeping.prefers_ghost(16, 1280, 320)
    assert not book_keeping.prefers_ghost(1024, 40, 160) and not book_keeping.prefers_ghost(196, 160, 640)


def test_the_self_check_catches_a_wrong_rule(monkeypatch):
    """A layer-norm rule that forgets the bias gradient: the check against the per-example loop must see it."""
    rule = book_keeping._LAYER_RULES["layer_norm"]

    def no_bias(module, normalized, g):
        squared, finish = rule(module, normalized, g)
        return squared, lambda weights: [finish(weights)[0], torch.zeros_like(module.bias)]

    for kind in ("layer_norm", "layer_norm_2d"):
        monkeypatch.setitem(book_keeping._LAYER_RULES, kind, no_bias)
    torch.manual_seed(0)
    assert max_relative_error(create_model("atto").to(DEVICE), *batch()) > 0.1


def one_example_clipped_sum(model, book, x, y, clip, loss_scale):
    """The engine's clipped sum for a single example (then the sum *is* that example's clipped gradient)."""
    nn.functional.binary_cross_entropy_with_logits(loss_scale * model(x), y, reduction="sum").backward()
    sums, squared = book.clipped_sums(lambda norms: BoundedClipDPOptimizer.clip_factors(norms, clip), loss_scale=False)
    return torch.sqrt(sum((total.double() ** 2).sum() for total in sums.values())), float(squared[0].sqrt())


@pytest.mark.parametrize("ratio", [1e-3, 1 - 1e-7, 1 + 1e-7, 1e3])
def test_clipped_contributions_never_exceed_the_bound(ratio):
    """Examples whose raw norm is far above, at and far below C: the clipped contribution's float64 norm is <= C."""
    torch.manual_seed(0)
    model = create_model("atto").to(DEVICE)
    book = BookKeeping(model)
    x, y = batch(n=6, size=64)
    for i in range(len(x)):
        for loss_scale in (1.0, 1e4):
            _, raw = one_example_clipped_sum(model, book, x[i:i + 1], y[i:i + 1], 1.0, loss_scale)
            clip = raw * ratio
            clipped, _ = one_example_clipped_sum(model, book, x[i:i + 1], y[i:i + 1], clip, loss_scale)
            assert clipped <= clip
            assert clipped >= min(raw, clip) * (1 - 1e-4)       # clipped to the bound, not far below it
    book.close()


def test_an_empty_poisson_batch_still_gets_its_noise():
    torch.manual_seed(1)
    sigma, clip = 1.3, 0.5
    model = create_model("atto").to(DEVICE)
    optimizer = BookKeepingDPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma,
                                       max_grad_norm=clip, expected_batch_size=1, loss_reduction="sum")
    optimizer.book = BookKeeping(model)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, y = batch(n=0)
    optimizer.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum").backward()
    optimizer.step()
    update = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    n = update.numel()
    assert abs(float(update.mean())) < 5 * sigma * clip / n ** 0.5
    assert abs(float(update.std()) / (sigma * clip) - 1) < 3.3 / (2 * n) ** 0.5


def test_a_layer_without_a_rule_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"no rule for 1 \(BatchNorm2d\); use train.engine: samplers"):
        BookKeeping(model)


def test_closing_restores_the_model():
    torch.manual_seed(0)
    model = create_model("micro").to(DEVICE)
    x, _ = batch()
    expected = model(x)
    BookKeeping(model).close()
    assert all("forward" not in vars(module) for module in model.modules())
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("clip", [1e-2, 1e6])
def test_a_mean_loss_gives_the_samplers_engines_clipped_sums(clip):
    """Opacus' loss_reduction="mean": each example's gradient is the recorded one times the batch size, clipped or
    not (with C = 1e6 nothing is clipped, so a wrong scale would show)."""
    from opacus import GradSampleModule

    x, y = batch(n=5)
    summed = {}
    for engine in ("samplers", "bk"):
        torch.manual_seed(0)
        model = create_model("atto").to(DEVICE)
        wrapped = GradSampleModule(model) if engine == "samplers" else model
        kind = BoundedClipDPOptimizer if engine == "samplers" else BookKeepingDPOptimizer
        optimizer = kind(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                         expected_batch_size=len(x))
        if engine == "bk":
            optimizer.book = BookKeeping(model)
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(wrapped(x), y, reduction="none").sum(1).mean().backward()
        optimizer.clip_and_accumulate()
        summed[engine] = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
    assert float((summed["bk"] - summed["samplers"]).norm() / summed["samplers"].norm()) < EXACT

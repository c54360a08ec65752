"""Per-sample gradients are exact for every supported model; clipping and noise are what the guarantee says."""

import copy

import pytest
import timm
import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.grad_sample_module import GradSampleModule as Hooks
from opacus.optimizers import DPOptimizer
from torch import nn

from models.convnext import create_model, fold_layer_scale
from models.per_sample import TOLERANCE, max_relative_error
from models.privacy import BoundedClipDPOptimizer
from tests.privacy import DEVICE


def batch(n=4, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, size, size, generator=generator).to(DEVICE),
            (torch.rand(n, 5, generator=generator) > 0.5).float().to(DEVICE))


@pytest.mark.parametrize("size", ["atto", "femto", "nano", "tiny"])
def test_per_sample_gradients_are_exact(size):
    torch.manual_seed(0)
    x, y = batch(size=32)
    assert max_relative_error(create_model(size).to(DEVICE), x, y) <= TOLERANCE


def test_the_self_check_catches_stock_opacus_conv_sampler():
    """Opacus' own Conv2d sampler is wrong after LayerNorm2d (a permuted view): the check must see it."""
    torch.manual_seed(0)
    x, y = batch()
    ours = Hooks.GRAD_SAMPLERS[nn.Conv2d]
    Hooks.GRAD_SAMPLERS[nn.Conv2d] = compute_conv_grad_sample
    try:
        assert max_relative_error(create_model("atto").to(DEVICE), x, y) > 0.1
    finally:
        Hooks.GRAD_SAMPLERS[nn.Conv2d] = ours


def test_folding_layer_scale_is_exact():
    torch.manual_seed(0)
    original = timm.create_model("convnext_atto", num_classes=5, in_chans=1)
    for block in original.modules():
        if getattr(block, "gamma", None) is not None:
            block.gamma.data.uniform_(0.1, 2.0)
    folded = copy.deepcopy(original)
    fold_layer_scale(folded)
    assert all(getattr(b, "gamma", None) is None for b in folded.modules())
    x, _ = batch()
    torch.testing.assert_close(folded(x), original(x), rtol=1e-5, atol=1e-5)


def dp_optimizer(model, sigma, clip, expected_batch, kind=BoundedClipDPOptimizer):
    return kind(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                       expected_batch_size=expected_batch, loss_reduction="sum")


def clipped_norms(kind, clip):
    torch.manual_seed(0)
    model = GradSampleModule(create_model("atto").to(DEVICE), loss_reduction="sum")
    x, y = batch(n=8)
    norms = []
    for i in range(len(x)):
        optimizer = dp_optimizer(model, sigma=0.0, clip=clip, expected_batch=1, kind=kind)
        optimizer.zero_grad()
        # A large loss makes every raw per-sample gradient far above the bound.
        (1000 * nn.functional.binary_cross_entropy_with_logits(model(x[i:i + 1]), y[i:i + 1], reduction="sum")).backward()
        raw = torch.sqrt(sum((p.grad_sample ** 2).sum() for p in model.parameters()))
        assert raw > 10 * clip
        optimizer.pre_step()                # clip and accumulate, no noise (sigma = 0)
        norms.append(float(torch.sqrt(sum((p.summed_grad.double() ** 2).sum() for p in model.parameters()))))
    return norms


def test_every_clipped_per_sample_gradient_is_within_the_bound():
    clip = 0.05
    norms = clipped_norms(BoundedClipDPOptimizer, clip)
    assert max(norms) <= clip
    assert min(norms) > clip * 0.999        # clipped to the bound, not below it


def test_stock_opacus_clipping_overshoots_the_bound_in_float32():
    """Why BoundedClipDPOptimizer exists: stock float32 clipping leaves norms slightly above C."""
    assert max(clipped_norms(DPOptimizer, 0.05)) > 0.05


def test_noise_standard_deviation_is_sigma_times_c_on_a_zero_gradient_step():
    torch.manual_seed(1)
    sigma, clip = 1.3, 0.5
    model = GradSampleModule(create_model("atto").to(DEVICE), loss_reduction="sum")
    optimizer = dp_optimizer(model, sigma=sigma, clip=clip, expected_batch=1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, _ = batch(n=4)
    optimizer.zero_grad()
    (0.0 * model(x).sum()).backward()       # every per-sample gradient is exactly zero
    optimizer.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    update = before - after                 # lr 1, sum reduction: the update is the noise itself
    n = update.numel()
    assert abs(float(update.mean())) < 5 * sigma * clip / n ** 0.5
    # 99.9% interval of the sample standard deviation of n normal draws: sd * (1 +- 3.3 / sqrt(2n)).
    assert abs(float(update.std()) / (sigma * clip) - 1) < 3.3 / (2 * n) ** 0.5

"""Exact per-sample gradients for timm ConvNeXt under Opacus 1.6, and the self-check that proves them.

Stock Opacus gets them wrong on ConvNeXt (measured by tests/privacy/test_per_sample.py): its Conv2d sampler
assumes NCHW-contiguous activations, but timm's ``LayerNorm2d`` hands the next convolution a permuted view,
so those convolutions' per-sample gradients are garbage (relative error about 1.4) while ``ModuleValidator``
reports nothing. Importing this module registers samplers that are exact:

- ``nn.Conv2d``: contiguous activations; depthwise convolutions by one grouped convolution of the inputs with the output
  gradients, O(N*C*k^2*HW) instead of Opacus' O(N*C^2*k^2*HW) einsum that keeps only the diagonal;
- timm ``LayerNorm2d`` (channels-first) and timm ``LayerNorm`` (channels-last) by their closed forms.

It also stops Opacus from zero-filling a buffer and copying each fresh per-sample gradient into it
(``_adopt_or_accumulate``), which is 10-25% of a DP step at 64 px.

``max_relative_error`` compares Opacus' per-sample gradients with a per-example autograd loop; training
refuses to start when it exceeds ``TOLERANCE``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import grad_sample_module, register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from timm.layers import LayerNorm, LayerNorm2d
from torch import nn

TOLERANCE = 1e-4


@register_grad_sampler(nn.Conv2d)
def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
                       ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d from its (made contiguous) input and output gradient."""
    x = activations[0].contiguous()
    pointwise = (layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid")
                 and layer.groups == 1)
    depthwise = layer.groups == layer.in_channels == layer.out_channels and layer.groups > 1
    if depthwise and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        depthwise = False
    if not (pointwise or depthwise):
        return _fresh(compute_conv_grad_sample(layer, [x], backprops))
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if pointwise:   # a 1x1 convolution is a linear map at every position: one batched matmul
            grad = torch.einsum("nohw,nihw->noi", backprops, x)
            out[layer.weight] = grad.view(*grad.shape, 1, 1)
        else:
            out[layer.weight] = depthwise_weight_grad(layer, x, backprops.contiguous())
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return _fresh(out)


def _fresh(grads: dict[nn.Parameter, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    """Marks per-sample gradients computed here (never views of autograd's buffers) as safe to adopt."""
    for tensor in grads.values():
        tensor._dp_cxr_fresh = True
    return grads


def depthwise_weight_grad(layer: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients (n, c, 1, kh, kw) of a depthwise convolution.

    grad[n, c, 0, i, j] = sum_hw x_pad[n, c, h*s + i*d, w*s + j*d] * g[n, c, h, w]: a cross-correlation of each
    example's padded input channel with its own output gradient, i.e. one convolution with n*c groups whose
    kernels are the output gradients (stride and dilation swap roles). Measured on convnext_atto's depthwise
    layers: 4-15x faster than a loop over the k*k kernel offsets, and faster than autograd's batched weight
    gradient.
    """
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = layer.kernel_size, layer.stride, layer.dilation, layer.padding
    n, c, h_out, w_out = g.shape
    if n == 0:          # an empty Poisson batch (a convolution cannot have zero groups)
        return g.new_zeros(0, c, 1, kh, kw)
    grad = F.conv2d(x.reshape(1, n * c, *x.shape[2:]), g.reshape(n * c, 1, h_out, w_out), padding=(ph, pw),
                    stride=(dh, dw), dilation=(sh, sw), groups=n * c)
    return grad[:, :, :kh, :kw].reshape(n, c, 1, kh, kw)


@register_grad_sampler(LayerNorm2d)
def layer_norm_2d_grad_sample(layer: LayerNorm2d, activations: list[torch.Tensor], backprops: torch.Tensor
                              ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of timm's channels-first LayerNorm2d (normalises over C at each position)."""
    x = activations[0].permute(0, 2, 3, 1)
    normalized = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    g = backprops.permute(0, 2, 3, 1)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.einsum("nhwc,nhwc->nc", normalized, g)
    if layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=(1, 2))
    return _fresh(out)


# timm's channels-last LayerNorm is an nn.LayerNorm subclass; Opacus matches samplers by exact type.
register_grad_sampler(LayerNorm)(compute_layer_norm_grad_sample)

_create_or_accumulate = grad_sample_module.create_or_accumulate_grad_sample


def _adopt_or_accumulate(*, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int) -> None:
    """Opacus' ``create_or_accumulate_grad_sample``, adopting a full-batch fresh tensor instead of copying it.

    Only tensors our samplers made (``_fresh``) are adopted: Opacus' own samplers may return views of the
    backward pass's buffers, which must be copied as Opacus does.
    """
    fresh = getattr(grad_sample, "_dp_cxr_fresh", False) and grad_sample.shape[0] == max_batch_len
    if param.requires_grad and fresh and not hasattr(param, "_current_grad_sample"):
        param._current_grad_sample = grad_sample
    else:
        _create_or_accumulate(param=param, grad_sample=grad_sample, max_batch_len=max_batch_len)


grad_sample_module.create_or_accumulate_grad_sample = _adopt_or_accumulate


def max_relative_error(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Largest relative L2 error of Opacus' per-sample gradients against a per-example autograd loop.

    Args:
        model: the plain (unwrapped) model; it is not modified.
        images: a few inputs (N, 1, S, S).
        targets: their multi-label targets (N, L).

    Returns:
        max over examples and parameters of ||opacus - reference|| / ||reference||.
    """
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    was_training = model.training
    model.train()   # Opacus records activations only in training mode; ConvNeXt has no batch statistics
    reference = []
    for i in range(len(images)):
        model.zero_grad(set_to_none=True)
        loss_fn(model(images[i:i + 1]), targets[i:i + 1]).backward()
        reference.append({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        wrapped.zero_grad(set_to_none=True)
        loss_fn(wrapped(images), targets).backward()
        worst = 0.0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            for i, expected in enumerate(reference):
                error = (p.grad_sample[i] - expected[name]).norm() / expected[name].norm().clamp_min(1e-12)
                worst = max(worst, float(error))
    finally:
        wrapped._close()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad_sample = None
        model.train(was_training)
    return worst

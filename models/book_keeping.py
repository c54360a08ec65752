"""The book-keeping DP engine: clipped per-sample gradient sums for timm ConvNeXt in one backward pass.

Book-keeping (Bu et al., ICML 2023) with mixed ghost norms (Bu et al., NeurIPS 2022). Every layer that owns
parameters (``nn.Linear``, ``nn.Conv2d``, timm's ``LayerNorm`` and ``LayerNorm2d``) runs its forward with
*detached* parameters, so autograd computes only the gradients that flow back through the network and never
the (non-private) parameter gradients; the layer keeps its input activation and, through a tensor hook, the
gradient of its output. After the backward pass, per layer:

- each example's squared gradient norm, by the cheaper of two exact routes for the layer's shape
  (``prefers_ghost``): the ghost norm ``sum((a a^T) * (g g^T))`` from the activation and output-gradient Gram
  matrices over the layer's tokens (computed in float64: it is a difference of large terms), or the norm of the
  materialised per-sample gradient ``g^T a`` (a sum of squares);
- then, with the clip factors ``c_i`` of every layer's norms together, the clipped sum ``sum_i c_i * grad_i``:
  one ``(c * g)^T a`` product for ghost layers, a weighted sum of the per-sample gradients already materialised
  for the others. No per-sample gradient of a ghost layer is ever formed and no second backward pass is run.

``BookKeepingDPOptimizer`` puts these sums where Opacus' ``DPOptimizer`` expects its clipped sums
(``p.summed_grad``), so Poisson sampling, ``BatchMemoryManager``, the noise, the accountant hook and the skip
queue are Opacus' own; the clip factors are ``BoundedClipDPOptimizer``'s (float64, shrunk by its safety margin).
``max_relative_error`` is the engine's self-check against a per-example autograd loop.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from models.per_sample import depthwise_weight_grad
from models.privacy import BoundedClipDPOptimizer, DistributedBoundedClipDPOptimizer


def prefers_ghost(tokens: int, fan_in: int, fan_out: int) -> bool:
    """Whether the ghost norm is cheaper than materialising per-sample gradients for a (tokens, in, out) layer.

    Both routes pay one ``tokens * in * out`` product per example (the per-sample gradient, or the clipped sum's
    share of one large product). On top, the ghost norm builds two Gram matrices, ``tokens^2 * (in + out)``
    multiply-adds in float64, while materialising writes ``in * out`` numbers per example and reads them twice
    (norm, weighted sum). Measured on this project's 2-core CPU (``benchmarks/dp_step.py --layers``, every
    Linear and dense Conv2d of convnext_atto at 64-224 px): a Gram multiply-add costs about 3 units of a float32
    GEMM multiply-add and a materialised number about 80, so ghost wins when
    ``tokens^2 * (in + out) < 25 * in * out``: the deep stages' few tokens and many channels.
    """
    return tokens * tokens * (fan_in + fan_out) < 25 * fan_in * fan_out


@dataclass
class _Pass:
    """One layer's records of one forward/backward pass: its input activation and its output's gradient."""

    activation: torch.Tensor
    grad: torch.Tensor | None = None


@dataclass
class _Layer:
    module: nn.Module
    kind: str
    passes: list[_Pass] = field(default_factory=list)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The layer's parameters (weight, then bias), in the order its rule returns their sums."""
        return self.module.parameters(recurse=False)


class BookKeeping:
    """Installs the recording forwards on a model's layers and turns the records into clipped gradient sums.

    Raises:
        ValueError: a trainable parameter belongs to a module this engine has no rule for.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers: list[_Layer] = []
        for name, module in model.named_modules():
            own = [p.requires_grad for p in module.parameters(recurse=False)]
            if not any(own):
                continue
            kind = _kind(module)
            if kind is None or not all(own):
                raise ValueError(f"the book-keeping engine has no rule for {name or 'the model'} "
                                 f"({type(module).__name__}{', partly frozen' if kind else ''}); "
                                 f"use train.engine: samplers")
            layer = _Layer(module, kind)
            forward = _FORWARDS[kind]
            module.forward = types.MethodType(lambda m, x, _f=forward, _l=layer: _f(m, x, _l), module)
            self.layers.append(layer)

    def close(self) -> None:
        """Restores the modules' own forwards and drops the records."""
        for layer in self.layers:
            del layer.module.forward
        self.clear()

    def clear(self) -> None:
        """Drops the records (Opacus' ``zero_grad`` and every clipping call this)."""
        for layer in self.layers:
            layer.passes.clear()

    def passes(self) -> int:
        """The number of recorded forward/backward passes (each a batch of distinct examples)."""
        counts = {len(layer.passes) for layer in self.layers}
        if len(counts) != 1:
            raise RuntimeError("layers saw different numbers of forward passes (a layer used twice per forward?): "
                               "the book-keeping engine cannot attribute its gradients to examples")
        return counts.pop()

    def clipped_sums(self, factors: Callable[[torch.Tensor], torch.Tensor], loss_scale: bool
                     ) -> tuple[dict[nn.Parameter, torch.Tensor], list[torch.Tensor]]:
        """The clipped per-sample gradient sums of every recorded pass, and each pass's squared norms.

        Args:
            factors: each example's clip factor (float64) from its squared norm: the optimizer's own
                ``clip_factors`` at its bound.
            loss_scale: the loss was a mean over the pass's examples (Opacus' ``loss_reduction="mean"``): each
                example's gradient is the recorded one times the pass's batch size.

        Returns:
            ``({parameter: sum_i c_i * grad_i}, [float64 squared norms (n,) per pass])``; the records are dropped.
        """
        sums: dict[nn.Parameter, torch.Tensor] = {}
        all_norms = []
        for index in range(self.passes()):
            records = [layer.passes[index] for layer in self.layers]
            if any(record.grad is None for record in records):
                raise RuntimeError("a recorded forward pass had no backward pass: call backward() before step()")
            n = len(records[0].activation)
            if n == 0:              # an empty Poisson batch: nothing to add (its step still gets the noise)
                all_norms.append(torch.zeros(0, dtype=torch.float64))
                continue
            scale = float(n) if loss_scale else 1.0
            norms = torch.zeros(n, dtype=torch.float64)
            plans = []
            for layer, record in zip(self.layers, records, strict=True):
                squared, finish = _LAYER_RULES[layer.kind](layer.module, record.activation, record.grad)
                norms += squared
                plans.append((layer, finish))
            norms *= scale * scale
            weights = factors(norms) * scale
            for layer, finish in plans:
                for p, total in zip(layer.parameters(), finish(weights), strict=True):
                    sums[p] = total if p not in sums else sums[p] + total
            all_norms.append(norms)
        self.clear()
        return sums, all_norms


class BookKeepingDPOptimizer(BoundedClipDPOptimizer):
    """Opacus' DPOptimizer whose clipped sums come from ``BookKeeping`` instead of per-sample gradients.

    ``book`` is set by ``models.privacy.make_private``; without it (the audit's shadow clipper) per-sample
    gradients handed over in ``p.grad_sample`` are clipped as ``BoundedClipDPOptimizer`` does; both paths take
    their factors from ``clip_factors``. Noise, scaling, the skip queue of ``BatchMemoryManager`` and the
    accountant hook are Opacus'; ``accumulated_iterations`` counts the passes the last clipping summed.
    """

    book: BookKeeping
    _summed_passes: int = 0

    def clip_and_accumulate(self) -> None:
        """Adds the clipped sums of the recorded passes to ``p.summed_grad`` (zeros when none was recorded)."""
        if getattr(self, "book", None) is None:     # per-sample gradients handed over directly (audit canaries)
            super().clip_and_accumulate()
            return
        sums, norms = self.book.clipped_sums(lambda squared: self.clip_factors(squared, self.max_grad_norm),
                                             loss_scale=self.loss_reduction == "mean")
        self._summed_passes = len(norms)
        for p in self.params:
            grad = sums.get(p)
            if grad is None:        # no pass recorded: nothing to add, but the step still gets its noise
                grad = torch.zeros_like(p)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad

    @property
    def accumulated_iterations(self) -> int:
        """The passes the last clipping summed (Opacus' accountant hook multiplies the sampling rate by it)."""
        return max(self._summed_passes, 1)

    def pre_step(self, closure: object = None) -> bool:
        """Opacus' ``pre_step`` without its per-sample-gradient checks: clip and sum, then noise unless skipped."""
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Opacus' ``zero_grad``, and the book-keeping records dropped with the per-sample state."""
        super().zero_grad(set_to_none)
        if getattr(self, "book", None) is not None:
            self.book.clear()


class DistributedBookKeepingDPOptimizer(BookKeepingDPOptimizer, DistributedBoundedClipDPOptimizer):
    """``BookKeepingDPOptimizer`` in a process group: its clipped sums, Opacus' distributed noise and all-reduce."""


# --- the layers' recording forwards -------------------------------------------------------------------------------

def _record(output: torch.Tensor, activation: torch.Tensor, layer: _Layer) -> torch.Tensor:
    """Keeps ``activation`` and, once backward reaches it, the gradient of ``output``.

    ``output`` is made differentiable when nothing before this layer is (the network's first layer).
    """
    if not torch.is_grad_enabled():
        return output
    record = _Pass(activation.detach())
    layer.passes.append(record)
    if not output.requires_grad:
        output.requires_grad_()

    def keep(grad: torch.Tensor) -> None:
        record.grad = grad.detach()

    output.register_hook(keep)
    return output


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


def _linear_forward(module: nn.Linear, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
    return _record(F.linear(x, module.weight.detach(), _bias(module)), x, layer)


def _conv_forward(module: nn.Conv2d, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
    out = F.conv2d(x, module.weight.detach(), _bias(module), module.stride, module.padding, module.dilation,
                   module.groups)
    return _record(out, x, layer)


def _layer_norm_forward(module: nn.LayerNorm, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
    normalized = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    out = torch.addcmul(module.bias.detach(), normalized, module.weight.detach())
    return _record(out, normalized, layer)


def _layer_norm_2d_forward(module: LayerNorm2d, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
    normalized = F.layer_norm(x.permute(0, 2, 3, 1), module.normalized_shape, None, None, module.eps)
    out = _record(torch.addcmul(module.bias.detach(), normalized, module.weight.detach()), normalized, layer)
    return out.permute(0, 3, 1, 2)


def _kind(module: nn.Module) -> str | None:
    """The engine's rule for a layer: linear, conv (dense), depthwise or layer_norm; None when it has none."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        if module.groups == 1:
            return "conv"
        return "depthwise" if module.groups == module.in_channels == module.out_channels else None
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and module.bias is not None:
        # timm's LayerNorm2d (channels first) is an nn.LayerNorm too: it records its channels-last view
        return "layer_norm_2d" if isinstance(module, LayerNorm2d) else "layer_norm"
    return None


_FORWARDS = {"linear": _linear_forward, "conv": _conv_forward, "depthwise": _conv_forward,
             "layer_norm": _layer_norm_forward, "layer_norm_2d": _layer_norm_2d_forward}


# --- per layer kind: (squared norms (n,) float64, finish(weights) -> clipped sums per parameter) ---------------------

def _squared(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor.flatten(1), dim=1).double() ** 2


def _weighted(weights: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * per_sample[i]."""
    return (weights.to(per_sample.dtype) @ per_sample.flatten(1)).view(per_sample.shape[1:])


def _tokens(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation (n, tokens, in) and output gradient (n, tokens, out) of a Linear or a dense Conv2d."""
    n = len(a)
    if isinstance(module, nn.Linear):
        return a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
    if module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0):
        patches = a.flatten(2)
    else:
        patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
    return patches.transpose(1, 2), g.flatten(2).transpose(1, 2)


def _dense_rule(module: nn.Module, a: torch.Tensor, g: torch.Tensor, ghost: bool | None = None
                ) -> tuple[torch.Tensor, object]:
    """A Linear's or dense Conv2d's squared norms and clipped sums, by the ghost norm or by materialising.

    ``ghost`` forces one route (benchmarks and tests); None takes the cheaper by ``prefers_ghost``.
    """
    a, g = _tokens(module, a, g)
    n, tokens, fan_in = a.shape
    fan_out = g.shape[-1]
    weight_shape = module.weight.shape
    per_sample = [] if module.bias is None else [g.sum(dim=1)]
    if ghost if ghost is not None else prefers_ghost(tokens, fan_in, fan_out):
        a64, g64 = a.double(), g.double()
        squared = (torch.bmm(a64, a64.transpose(1, 2)) * torch.bmm(g64, g64.transpose(1, 2))).sum((1, 2))

        def weight_sum(weights: torch.Tensor) -> torch.Tensor:
            scaled = g * weights.to(g.dtype).view(n, 1, 1)
            return (scaled.reshape(-1, fan_out).T @ a.reshape(-1, fan_in)).view(weight_shape)
    else:
        weight = torch.bmm(g.transpose(1, 2), a)        # (n, out, in)
        squared = _squared(weight)

        def weight_sum(weights: torch.Tensor) -> torch.Tensor:
            return _weighted(weights, weight).view(weight_shape)
    bias_squared, bias_sum = _materialised(per_sample)

    def finish(weights: torch.Tensor) -> list[torch.Tensor]:
        return [weight_sum(weights), *bias_sum(weights)]

    return squared + bias_squared, finish


def _depthwise_rule(module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, object]:
    per_sample = [depthwise_weight_grad(module, a.contiguous(), g.contiguous())]
    if module.bias is not None:
        per_sample.append(g.sum(dim=(2, 3)))
    return _materialised(per_sample)


def _layer_norm_rule(module: nn.LayerNorm, normalized: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, object]:
    n, channels = len(g), g.shape[-1]
    g = g.reshape(n, -1, channels)
    return _materialised([(normalized.reshape(n, -1, channels) * g).sum(dim=1), g.sum(dim=1)])


def _materialised(per_sample: list[torch.Tensor]) -> tuple[torch.Tensor | float, object]:
    squared = sum((_squared(tensor) for tensor in per_sample), 0.0)

    def finish(weights: torch.Tensor) -> list[torch.Tensor]:
        return [_weighted(weights, tensor) for tensor in per_sample]

    return squared, finish


_LAYER_RULES = {"linear": _dense_rule, "conv": _dense_rule, "depthwise": _depthwise_rule,
                "layer_norm": _layer_norm_rule, "layer_norm_2d": _layer_norm_rule}


def max_relative_error(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Largest relative error of the engine's per-example norms and clipped sum against a per-example autograd loop.

    The bound C is set to the median per-example norm, so both clipped and unclipped examples are checked.

    Args:
        model: the plain (unwrapped) model; it is not modified.
        images: a few inputs (N, 1, S, S).
        targets: their multi-label targets (N, L).

    Returns:
        max of the per-example norms' relative errors and, per parameter, ``||bk - loop|| / ||loop||`` of the
        clipped sums.
    """
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    was_training = model.training
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    reference = []
    for i in range(len(images)):
        model.zero_grad(set_to_none=True)
        loss_fn(model(images[i:i + 1]), targets[i:i + 1]).backward()
        reference.append([p.grad.detach().double().clone() for p in params])
    model.zero_grad(set_to_none=True)
    norms = torch.stack([sum(grad.pow(2).sum() for grad in grads) for grads in reference]).sqrt()
    bound = float(norms.median())
    factors = BoundedClipDPOptimizer.clip_factors(norms**2, bound)
    expected = [sum(factors[i] * reference[i][k] for i in range(len(images))) for k in range(len(params))]
    book = BookKeeping(model)
    try:
        loss_fn(model(images), targets).backward()
        sums, squared = book.clipped_sums(lambda squared: BoundedClipDPOptimizer.clip_factors(squared, bound),
                                          loss_scale=False)
    finally:
        book.close()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    worst = float(((squared[0].sqrt() - norms).abs() / norms.clamp_min(1e-12)).max())
    for p, want in zip(params, expected, strict=True):
        got = sums[p].double()
        worst = max(worst, float((got - want).norm() / want.norm().clamp_min(1e-12)))
    return worst

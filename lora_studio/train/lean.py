"""Keep less for the backward pass of a LoRA run, without changing a bit of its results (``lean_backward``).

Autograd decides per op, not per run, what to keep for the backward, so a frozen model keeps more than its
LoRA's gradients need:

* a convolution keeps its input even when its weight and bias are frozen, although the input's gradient
  needs only the weight. In a LoRA run every UNet convolution is frozen (a LoCon's base convolution too), so
  each one's input (every ResNet's SiLU output, every transformer's normed input, ...) is kept for nothing.
  ``FrozenConv2d`` keeps the weight alone and asks ``convolution_backward`` for the input's gradient only.
* GEGLU, the feed-forward of every transformer block, computes ``hidden * gelu(gate)`` from one projection
  and keeps ``gelu(gate)`` beside the projection it came from. ``GegluProduct`` keeps the projection alone and
  recomputes the GELU in the backward: one more elementwise op per block.

Measured on the SD 1.5 UNet at 512 px, batch 1, bf16 autocast (the bytes of the tensors saved for the backward,
weights excluded): 793 MiB without either, 585 MiB with both (0.74x); the convolutions alone give about 0.85x
(bench/RESULTS.md). ``torch.compile`` finds such savings by itself; this is for the eager runs. The cost is
Python: an autograd.Function call is about 13 us more per convolution and 7 us per GEGLU than the built-in
path (micro-benchmark on this project's CPU), about 1.4 ms per SD 1.5 step; ``lean_backward=False`` saves it
where memory is plentiful and steps are short.
Written by hand because neither torch nor diffusers offers it: ``torch.utils.checkpoint`` recomputes whole
regions, which costs a second forward pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


_CONV_BACKWARD = torch.ops.aten.convolution_backward.default  # the overload itself: no per-call resolution
_INPUT_GRAD_ONLY = [True, False, False]


class FrozenConv2d(torch.autograd.Function):
    """``F.conv2d`` for a frozen weight and bias: the backward gives the input's gradient only."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # autocast applies here as usual

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        if weight.dtype != grad.dtype:  # a frozen fp32 weight that autocast ran in half precision
            weight = weight.to(grad.dtype)
        # the input's values are not read for the input's gradient: a one-element stand-in of its shape does
        # (as torch.nn.grad.conv2d_input does; the gradient's memory format follows grad and weight)
        grad_x = _CONV_BACKWARD(grad, grad.new_empty(1).expand(shape), weight, None, stride, padding, dilation,
                                False, [0, 0], groups, _INPUT_GRAD_ONLY)[0]
        return grad_x, None, None, None, None, None, None


class GegluProduct(torch.autograd.Function):
    """``hidden * gelu(gate)`` for ``hidden, gate = projected.chunk(2, -1)``, keeping only ``projected``."""

    @staticmethod
    def forward(ctx, projected):
        ctx.save_for_backward(projected)
        hidden, gate = projected.chunk(2, dim=-1)
        return hidden * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad):
        (projected,) = ctx.saved_tensors
        hidden, gate = projected.chunk(2, dim=-1)
        grad_hidden = grad * F.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad * hidden, gate)
        return torch.cat([grad_hidden, grad_gate], dim=-1)


def _conv_forward(module: nn.Conv2d):
    # the Parameter objects stay the same while training runs (casts and moves swap their .data), so they and
    # the fixed settings are bound once instead of looked up through nn.Module on every call
    args = (module.weight, module.bias, tuple(module.stride), tuple(module.padding), tuple(module.dilation),
            module.groups)
    apply = FrozenConv2d.apply

    def forward(x):
        return apply(x, *args)
    return forward


def _geglu_forward(module: nn.Module):
    def forward(hidden_states, *args, **kwargs):
        return GegluProduct.apply(module.proj(hidden_states))
    return forward


def _lean_forwards(model: nn.Module) -> Iterator[tuple[nn.Module, object]]:
    """(module, its lean forward) for every frozen plain convolution and every diffusers GEGLU in ``model``."""
    from diffusers.models.activations import GEGLU

    for m in model.modules():
        if (type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                and not m.weight.requires_grad and (m.bias is None or not m.bias.requires_grad)):
            yield m, _conv_forward(m)
        elif type(m) is GEGLU:  # its own subclasses may compute something else
            yield m, _geglu_forward(m)


@contextmanager
def lean_backward(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """While inside: ``model``'s frozen convolutions and GEGLUs keep less for the backward (see the module
    docstring); yields how many modules changed. Call it after the LoRA layers are in, as it reads which
    weights are frozen. Their ``forward`` is set on the instances and removed again on leaving."""
    patched = list(_lean_forwards(model)) if enabled else []
    for m, forward in patched:
        m.forward = forward
    try:
        yield len(patched)
    finally:
        for m, _ in patched:
            m.__dict__.pop("forward", None)

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
* CUDA's autocast runs group and layer norms in fp32 (the CPU's does not), and the built-in norm keeps the fp32
  copy of its bf16/fp16 input: twice the bytes. ``LeanGroupNorm`` and ``LeanLayerNorm`` compute exactly what
  autocast would (found per device by running it, ``AutocastPolicy``) and keep the input as it came.
* every ResNet block runs SiLU on a group norm's output, and SiLU keeps its input, in fp32 under CUDA's
  autocast. ``LeanSilu`` keeps nothing of its own and recomputes the norm from the norm's kept input in the
  backward (one more memory-bound norm pass per block).

What it saves and what it costs (Python per op in eager steps) are measured in bench/RESULTS.md
(``bench/train_step.py --cuda-autocast``); it is an opt-in low-memory switch for that reason. ``torch.compile``
finds such savings by itself; this is for the eager runs.
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


_GROUP_NORM = torch.ops.aten.native_group_norm.default
_GROUP_NORM_BACKWARD = torch.ops.aten.native_group_norm_backward.default
_LAYER_NORM = torch.ops.aten.native_layer_norm.default
_LAYER_NORM_BACKWARD = torch.ops.aten.native_layer_norm_backward.default
_SILU_BACKWARD = torch.ops.aten.silu_backward.default


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _suggested_layout(x: torch.Tensor) -> torch.memory_format:
    """``Tensor.suggest_memory_format()``, which Python does not expose: the two dense 4-D layouts met here by
    two quick checks, anything else by torch's own Python spelling of it (slower: ~5 us)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(x)


def _group_norm_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``aten::group_norm`` hands to its kernel, and its autograd node keeps: ``x`` cast as autocast
    casts it, made contiguous in the layout the kernel wants (the input's own on the CPU, NCHW elsewhere)."""
    x = x.to(dtype)
    return x.contiguous(memory_format=_suggested_layout(x)) if x.device.type == "cpu" else x.contiguous()


def _group_norm_sizes(x: torch.Tensor) -> tuple[int, int, int]:
    """(N, C, HxW) as the group-norm kernels take them."""
    n, c = x.shape[:2]
    return n, c, x.numel() // max(n * c, 1)


def _group_norm(x_in: torch.Tensor, weight, bias, groups: int, eps: float, dtype: torch.dtype):
    x = _group_norm_input(x_in, dtype)
    return _GROUP_NORM(x, _cast(weight, dtype), _cast(bias, dtype), *_group_norm_sizes(x), groups, eps)


class LeanGroupNorm(torch.autograd.Function):
    """``F.group_norm`` with a frozen affine, as autocast runs it (fp32 on CUDA), keeping ``x`` as it came.

    Under CUDA's autocast the built-in path keeps the fp32 copy of a bf16/fp16 input: twice its bytes. The
    output carries how to recompute it (``RECIPE``), so a ``LeanSilu`` right after it need not keep it."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, dtype):
        y, mean, rstd = _group_norm(x, weight, bias, groups, eps, dtype)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.conf = (groups, dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        x_in, mean, rstd, weight = ctx.saved_tensors
        groups, dtype = ctx.conf
        x = _group_norm_input(x_in, dtype)
        if grad.device.type == "cpu":  # the layouts autograd's own group-norm backward asks for
            grad = grad.contiguous(memory_format=_suggested_layout(x))
        elif grad.device.type != "xpu":
            grad = grad.contiguous()
        grad_x = _GROUP_NORM_BACKWARD(grad, x, mean, rstd, _cast(weight, dtype), *_group_norm_sizes(x), groups,
                                      _INPUT_GRAD_ONLY)[0]
        return grad_x.to(x_in.dtype), None, None, None, None, None


class LeanSilu(torch.autograd.Function):
    """``F.silu(y)`` for ``y`` a ``LeanGroupNorm`` output: keeps nothing of its own and recomputes ``y`` from the
    group norm's input in the backward (one more group-norm pass, memory-bound)."""

    @staticmethod
    def forward(ctx, y, x_in, weight, bias, groups, eps, dtype):
        ctx.save_for_backward(x_in, weight, bias)
        ctx.conf = (groups, eps, dtype)
        return F.silu(y)

    @staticmethod
    def backward(ctx, grad):
        x_in, weight, bias = ctx.saved_tensors
        y = _group_norm(x_in, weight, bias, *ctx.conf)[0]
        return _SILU_BACKWARD(grad, y), None, None, None, None, None, None


class LeanLayerNorm(torch.autograd.Function):
    """``F.layer_norm`` with a frozen affine where autocast runs it in fp32 (CUDA): keeps the half-precision
    input instead of its fp32 copy."""

    @staticmethod
    def forward(ctx, x_in, shape, weight, bias, eps, dtype):
        y, mean, rstd = _LAYER_NORM(x_in.to(dtype), shape, _cast(weight, dtype), _cast(bias, dtype), eps)
        ctx.save_for_backward(x_in, mean, rstd, weight, bias)
        ctx.conf = (shape, dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        x_in, mean, rstd, weight, bias = ctx.saved_tensors
        shape, dtype = ctx.conf
        grad_x = _LAYER_NORM_BACKWARD(grad, x_in.to(dtype), shape, mean, rstd, _cast(weight, dtype),
                                      _cast(bias, dtype), _INPUT_GRAD_ONLY)[0]
        return grad_x.to(x_in.dtype), None, None, None, None, None


RECIPE = "_lean_group_norm"  # the attribute a LeanGroupNorm output carries: (version, the LeanSilu arguments)


class AutocastPolicy:
    """The dtype the built-in norms compute in under the current autocast, found once per (op, device, dtypes)
    by running the op on a tiny tensor: fp32 on CUDA, the input's own on the CPU (torch keeps these lists per
    device). One instance per ``lean_backward`` block, so a policy change between runs is seen."""

    def __init__(self) -> None:
        self._found: dict[tuple, torch.dtype] = {}

    def _autocast_dtype(self, op: str, device_type: str, dtype: torch.dtype) -> torch.dtype:
        key = (op, device_type, torch.get_autocast_dtype(device_type), dtype)
        if key not in self._found:
            with torch.no_grad(), torch.autocast(device_type, dtype=key[2]):
                t = torch.ones(1, 2, 2, dtype=dtype, device=device_type)
                self._found[key] = (F.group_norm(t, 1) if op == "group_norm" else F.layer_norm(t, (2,))).dtype
        return self._found[key]

    def compute_dtype(self, op: str, x: torch.Tensor, *params: torch.Tensor | None) -> torch.dtype | None:
        """The dtype the built-in ``op`` computes ``x`` in here, or None where its inputs mix dtypes without
        autocast casting them (left to the built-in path)."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.dtype != torch.float64:
            dtype = self._autocast_dtype(op, dev, x.dtype)
            if dtype != x.dtype:
                return dtype
        return x.dtype if all(p is None or p.dtype == x.dtype for p in params) else None


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


def _grad_needed(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _group_norm_forward(module: nn.GroupNorm, policy: AutocastPolicy):
    groups, eps, weight, bias = module.num_groups, module.eps, module.weight, module.bias

    def forward(x):
        dtype = policy.compute_dtype("group_norm", x, weight, bias) if _grad_needed(x) else None
        if dtype is None:
            return F.group_norm(x, groups, weight, bias, eps)
        y = LeanGroupNorm.apply(x, weight, bias, groups, eps, dtype)
        setattr(y, RECIPE, (y._version, (x.detach(), weight, bias, groups, eps, dtype)))
        return y
    return forward


def _silu_forward(module: nn.SiLU):
    inplace = module.inplace

    def forward(y):
        version, args = getattr(y, RECIPE, (None, None))
        if version is None or version != y._version:  # not a group norm's output as it came out of it
            return F.silu(y, inplace=inplace)
        return LeanSilu.apply(y, *args)
    return forward


def _layer_norm_forward(module: nn.LayerNorm, policy: AutocastPolicy):
    shape, eps, weight, bias = tuple(module.normalized_shape), module.eps, module.weight, module.bias

    def forward(x):
        dtype = policy.compute_dtype("layer_norm", x, weight, bias) if _grad_needed(x) else None
        if dtype is None or dtype == x.dtype:  # kept as it is: nothing to gain without autocast's fp32 copy
            return F.layer_norm(x, shape, weight, bias, eps)
        return LeanLayerNorm.apply(x, shape, weight, bias, eps, dtype)
    return forward


def _frozen(m: nn.Module) -> bool:
    return not any(p.requires_grad for p in m.parameters(recurse=False))


def _eager_only(module: nn.Module, lean_forward):
    """``lean_forward`` in eager runs; the module's own forward while ``torch.compile`` traces it. Compiling plans
    what to keep for the backward over the whole graph by itself, and the tag a group norm's output carries for
    its SiLU (a tensor attribute) breaks a compiled graph in two (22 breaks in the demo UNet, torch 2.13)."""
    own = type(module).forward
    is_compiling = torch.compiler.is_compiling

    def forward(*args, **kwargs):
        if is_compiling():
            return own(module, *args, **kwargs)
        return lean_forward(*args, **kwargs)
    return forward


def _lean_forwards(model: nn.Module) -> Iterator[tuple[nn.Module, object]]:
    """(module, its lean forward) for every frozen plain convolution, group norm and layer norm, every SiLU and
    every diffusers GEGLU in ``model``. Exact types only: a subclass may compute something else."""
    from diffusers.models.activations import GEGLU

    policy = AutocastPolicy()
    for m in model.modules():
        kind = type(m)
        if (kind is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str) and _frozen(m)):
            yield m, _conv_forward(m)
        elif kind is GEGLU:
            yield m, _geglu_forward(m)
        elif kind is nn.GroupNorm and _frozen(m):
            yield m, _group_norm_forward(m, policy)
        elif kind is nn.SiLU:
            yield m, _silu_forward(m)
        elif kind is nn.LayerNorm and _frozen(m):
            yield m, _layer_norm_forward(m, policy)


@contextmanager
def lean_backward(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """While inside: ``model``'s frozen convolutions and norms, its SiLUs and GEGLUs keep less for the backward
    in eager runs (see the module docstring; under ``torch.compile`` they are the modules' own); yields how many
    modules changed. Call it after the LoRA layers are in, as it reads which weights are frozen. Their
    ``forward`` is set on the instances and removed again on leaving."""
    patched = list(_lean_forwards(model)) if enabled else []
    for m, forward in patched:
        m.forward = _eager_only(m, forward)
    try:
        yield len(patched)
    finally:
        for m, _ in patched:
            m.__dict__.pop("forward", None)

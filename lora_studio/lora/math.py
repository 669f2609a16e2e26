"""Delta weights of LoRA modules, in fp32: the kind's own delta (``kinds``), fitted to a layer, and DoRA.

Written by hand: diffusers/peft apply only classic LoRA (and DoRA) to diffusers models, and no library
applies LyCORIS LoHa or LoKr to diffusers modules (diffusers' ``load_lora_weights`` rejects them).

* DoRA (``dora_scale`` m): the merged weight is ``m * (W0 + delta) / ||W0 + delta||`` where the norm runs
  over every axis except the one m keeps: m of shape (out, 1, ...) or peft's (out,) normalises each output row;
  m of shape (1, in, ...) (kohya/A1111 files) each input column. As a delta: ``that - W0``. Strength then
  scales this delta linearly, as AUTOMATIC1111 does (at strength 1 this equals the LyCORIS/peft merge).
"""

from __future__ import annotations

import math

import torch

from ..errors import LoraFormatError
from .module import LoraModule


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def raw_delta(mod: LoraModule) -> torch.Tensor:
    """The module's delta in the shape its factors give, scaled by ``mod.scale`` (alpha / rank), without DoRA."""
    return mod.spec.raw_delta(mod.tensors, mod.scale)


def natural_shape(mod: LoraModule) -> tuple[int, ...]:
    """The shape of ``raw_delta(mod)`` computed from the tensor shapes only (no arithmetic)."""
    return mod.spec.natural_shape(mod.tensors)


def delta_shape(mod: LoraModule, weight_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """``weight_shape`` if the module's delta fits a weight of that shape (same outputs, same element count,
    as A1111 checks), else None."""
    nat = natural_shape(mod)
    weight_shape = tuple(weight_shape)
    if nat == weight_shape:
        return weight_shape
    if nat and weight_shape and nat[0] == weight_shape[0] and math.prod(nat) == math.prod(weight_shape):
        return weight_shape
    return None


def apply_dora(delta: torch.Tensor, base: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """Turn a delta into the DoRA delta ``m * (W0 + delta) / ||W0 + delta|| - W0`` (see the module docstring)."""
    w0 = _f(base)
    merged = w0 + delta
    m = _f(dora_scale)
    rest = [1] * (merged.dim() - 1)
    if m.dim() == 1 or (m.shape[0] == merged.shape[0] and m.shape[0] != 1):  # one magnitude per output row
        m = m.reshape(merged.shape[0], *rest)
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(m.shape)
    elif m.numel() == merged.shape[1]:  # one magnitude per input column (kohya / A1111 files)
        m = m.reshape(1, merged.shape[1], *rest[1:])
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(m.shape)
    else:
        raise LoraFormatError(f"dora_scale of shape {tuple(dora_scale.shape)} fits neither the outputs nor the "
                              f"inputs of a weight of shape {tuple(merged.shape)}.")
    return merged * (m / norm) - w0


def module_delta(mod: LoraModule, weight_shape: tuple[int, ...], base: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The fp32 delta this module adds to a weight of ``weight_shape`` at strength 1, on ``device``
    (default: the factors' device).

    DoRA modules need the base weight ``base`` (the unmodified W0) because their delta depends on it.
    """
    weight_shape = tuple(weight_shape)
    if delta_shape(mod, weight_shape) is None:
        raise LoraFormatError(f"module {mod.name}: its delta has shape {natural_shape(mod)}, which does not fit "
                              f"the weight's shape {weight_shape}. The LoRA was made for another model.")
    if device is not None:
        mod = LoraModule(mod.name, mod.kind, {k: v.to(device) for k, v in mod.tensors.items()}, mod.alpha, mod.rank)
    d = raw_delta(mod).reshape(weight_shape)
    if "dora_scale" in mod.tensors:
        if base is None:
            raise ValueError(f"module {mod.name} is DoRA: module_delta needs the base weight")
        d = apply_dora(d, base.to(d.device), mod.tensors["dora_scale"])
    return d

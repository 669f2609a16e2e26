"""Delta weights of LoRA modules, in fp32: the kind's own delta (``kinds``), fitted to a layer, and DoRA.

Written by hand: diffusers/peft apply only classic LoRA (and DoRA) to diffusers models, and no library
applies LyCORIS LoHa or LoKr to diffusers modules (diffusers' ``load_lora_weights`` rejects them).

* DoRA (``dora_scale`` m): the merged weight is ``m * (W0 + delta) / ||W0 + delta||`` where the norm runs
  over every axis except the one m keeps. Which axis m keeps is read from where its singleton axes sit, never
  guessed from sizes (so a square convolution is unambiguous):

  - ``(out, 1)`` / ``(out, 1, 1, 1)`` (LyCORIS ``wd_on_out``, what LoRA Studio writes and ComfyUI reads) and a
    1-D ``(out,)`` (peft's linear magnitude): one magnitude per output row;
  - ``(1, in)`` / ``(1, in, 1, 1)`` (LyCORIS without ``wd_on_out``, kohya/A1111 files): one per input column.

  peft's conv magnitude ``(1, out, 1, 1)`` is per *output* (peft's ``_DoraConvNdLayer`` takes the norm over
  every axis but the output one) although it looks like the input layout: the reader (``formats.read_lora``)
  turns peft's magnitudes, and those of kohya files LoRA Studio's trainer wrote before it used LyCORIS's
  layout, into ``(out, 1, ...)`` before they reach this module.

  As a delta: ``D = that - W0``. Strength s scales D linearly, ``W = W0 + s * D``, as ComfyUI does
  (``weight_decompose``: ``weight += strength * (weight_calc - weight)``). LyCORIS's own runtime instead
  applies ``W = (W0 + s*delta) * (1 + s * (m / ||W0 + s*delta|| - 1))``: both equal peft's merge at s = 1 and
  differ at any other strength (below 1 LyCORIS renormalises the partly added delta).
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
    out_dim, in_dim = merged.shape[0], merged.shape[1]
    rest = [1] * (merged.dim() - 1)
    shape = tuple(m.shape)
    if shape == (out_dim,) or (m.dim() >= 2 and shape[0] == out_dim and all(s == 1 for s in shape[1:])):
        m = m.reshape(out_dim, *rest)                       # one magnitude per output row
        norm = merged.reshape(out_dim, -1).norm(dim=1).reshape(m.shape)
    elif m.dim() >= 2 and shape[0] == 1 and shape[1] == in_dim and all(s == 1 for s in shape[2:]):
        m = m.reshape(1, in_dim, *rest[1:])                 # one magnitude per input column
        norm = merged.transpose(0, 1).reshape(in_dim, -1).norm(dim=1).reshape(m.shape)
    else:
        raise LoraFormatError(f"dora_scale of shape {shape} fits neither the outputs nor the inputs of a weight "
                              f"of shape {tuple(merged.shape)}: DoRA magnitudes are ({out_dim}, 1, ...) per output "
                              f"or (1, {in_dim}, ...) per input. The file is damaged or was made for another "
                              "model: download or export it again.")
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

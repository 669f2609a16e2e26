"""Delta weights of LoRA modules, in fp32.

Written by hand: diffusers/peft apply only classic LoRA (and DoRA) to diffusers models, and no library
applies LyCORIS LoHa or LoKr to diffusers modules (diffusers' ``load_lora_weights`` rejects them). The
formulas follow LyCORIS and AUTOMATIC1111's built-in Lora extension, the two implementations real files
are made for and used with:

* LoRA / LoCon:  ``delta = up @ down * alpha / r``; conv down (r, in, kh, kw), up (out, r, 1, 1); with a
  Tucker core ``lora_mid`` (r, r, kh, kw): ``delta[o,i,k,l] = sum up[o,n] mid[n,m,k,l] down[m,i]``.
* LoHa: ``delta = (w1a @ w1b) * (w2a @ w2b) * alpha / r`` (r = rows of ``hada_w1_b``); with Tucker cores
  ``hada_t1``/``hada_t2`` each factor is ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)``.
* LoKr: ``delta = kron(w1, w2)`` where each of w1, w2 is stored whole (``lokr_w1``) or factored
  (``lokr_w1_a @ lokr_w1_b``; w2 may have a Tucker core ``lokr_t2``). ``alpha / r`` is applied only when a
  factor is factored (r = rows of the ``_b`` factor), as LyCORIS does; two whole factors mean scale 1.
  Conv weights are rebuilt by reshaping the Kronecker product to (out, in, kh, kw).
* full: ``delta = diff``.
* DoRA (``dora_scale`` m): the merged weight is ``m * (W0 + delta) / ||W0 + delta||`` where the norm runs
  over every axis except the one m keeps: m of shape (out, 1, ...) or peft's (out,) normalises each output row;
  m of shape (1, in, ...) (kohya/A1111 files) each input column. As a delta: ``that - W0``. Strength then
  scales this delta linearly, as AUTOMATIC1111 does (at strength 1 this equals the LyCORIS/peft merge).
"""

from __future__ import annotations

import math

import torch

from ..errors import LoraFormatError
from .formats import LoraModule


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild used by LyCORIS: (r, r, kh, kw) core with (r, out) and (r, in) factors."""
    return torch.einsum("ijkl,jr,ip->prkl", _f(t), _f(wb).flatten(1), _f(wa).flatten(1))


def _factor(mod: LoraModule, whole: str, a: str, b: str, core: str | None = None) -> torch.Tensor:
    ts = mod.tensors
    if whole in ts:
        return _f(ts[whole])
    if core is not None and core in ts:
        return _cp(ts[core], ts[a], ts[b])
    return _f(ts[a]).flatten(1) @ _f(ts[b]).flatten(1)


def raw_delta(mod: LoraModule) -> torch.Tensor:
    """The module's delta in the shape its factors give, scaled by ``mod.scale`` (alpha / rank), without DoRA.

    The scale is folded into the smallest factor, so the full-size delta is written once (this is the hot
    path of ``LoraMixer.apply``: the deltas of a whole-UNet LoKr run to ~1e9 elements for SD 1.5).
    """
    ts, scale = mod.tensors, mod.scale
    if mod.kind in ("lora", "locon"):
        up, down = _f(ts["lora_up.weight"]).flatten(1) * scale, _f(ts["lora_down.weight"])
        if "lora_mid.weight" in ts:
            return torch.einsum("nmkl,in,mj->ijkl", _f(ts["lora_mid.weight"]), up, down.flatten(1))
        return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    if mod.kind == "loha":
        w1 = _factor(mod, "", "hada_w1_a", "hada_w1_b", "hada_t1") * scale
        return w1 * _factor(mod, "", "hada_w2_a", "hada_w2_b", "hada_t2")
    if mod.kind == "lokr":
        w1 = _factor(mod, "lokr_w1", "lokr_w1_a", "lokr_w1_b") * scale
        w2 = _factor(mod, "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        if w2.dim() == 4:
            w1 = w1.reshape(*w1.shape, 1, 1)
        return torch.kron(w1.contiguous(), w2.contiguous())
    if mod.kind == "full":
        d = _f(ts["diff"])
        return d if scale == 1.0 else d * scale
    raise LoraFormatError(f"module {mod.name}: unknown kind {mod.kind!r}.")


def natural_shape(mod: LoraModule) -> tuple[int, ...]:
    """The shape of ``raw_delta(mod)`` computed from the tensor shapes only (no arithmetic)."""
    ts = mod.tensors
    if mod.kind in ("lora", "locon"):
        up, down = ts["lora_up.weight"], ts["lora_down.weight"]
        if "lora_mid.weight" in ts:
            return (up.shape[0], down.shape[1], *ts["lora_mid.weight"].shape[2:])
        return (up.shape[0], *down.shape[1:])
    if mod.kind == "loha":
        if "hada_t1" in ts:
            return (ts["hada_w1_a"].shape[1], ts["hada_w1_b"].shape[1], *ts["hada_t1"].shape[2:])
        return (ts["hada_w1_a"].shape[0], math.prod(ts["hada_w1_b"].shape[1:]))
    if mod.kind == "lokr":
        def dims(whole, a, b, core=None):
            if whole in ts:
                return tuple(ts[whole].shape)
            if core and core in ts:
                return (ts[a].shape[1], ts[b].shape[1], *ts[core].shape[2:])
            return (ts[a].shape[0], math.prod(ts[b].shape[1:]))
        s1, s2 = dims("lokr_w1", "lokr_w1_a", "lokr_w1_b"), dims("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        return (s1[0] * s2[0], s1[1] * s2[1], *s2[2:])
    if mod.kind == "full":
        return tuple(ts["diff"].shape)
    raise LoraFormatError(f"module {mod.name}: unknown kind {mod.kind!r}.")


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

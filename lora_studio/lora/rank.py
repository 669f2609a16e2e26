"""Rank math by SVD: choose a rank, factor a delta, resize / merge / extract LoRA modules.

Everything here is pure torch in fp32 on plain tensors and ``LoraModule`` objects; file reading and writing
lives in ``lora_studio.export``. Written by hand because no library offers rank selection by energy retention
on kohya-layout factors.

Conventions (kohya's): a module applies ``delta = up @ down * (alpha / rank)``; a conv module (LoCon) has
``down`` (r, in, kh, kw) and ``up`` (out, r, 1, 1), and its delta is the product of the flattened factors
reshaped to (out, in, kh, kw).

**Alpha after resizing.** ``resize_module`` keeps the module's ``alpha / rank`` ratio: the new module gets
``alpha' = new_rank * alpha / rank`` and its factors hold the truncated SVD of ``up @ down``, so
``alpha' / new_rank * up' @ down'`` is exactly the rank-``new_rank`` truncation of the original delta. Keeping the
ratio (as kohya's resize script does) keeps the factors at the magnitude the trainer gave them, which matters
when they are stored in fp16. Modules built from a plain delta (merges, extraction, LoHa/LoKr input) get
``alpha = rank`` (scale 1) with the delta in the factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from ..errors import ConfigError, LoraFormatError
from .math import module_delta, natural_shape, raw_delta
from .module import LoraModule

METHODS = ("fixed", "ratio", "energy")
_ENERGY_TOL = 1e-9  # cumulative energy is computed in fp64; this absorbs rounding so p = 1.0 means "all of it"


@dataclass
class ResizeStat:
    """What a resize / merge / extraction did to one module.

    ``energy_kept`` is the share of the squared singular values (the squared Frobenius norm of the delta) that
    the kept rank holds; ``singular_values`` is the module's whole spectrum (descending, fp32), for plots.
    """

    name: str
    old_rank: int
    new_rank: int
    energy_kept: float
    singular_values: torch.Tensor | None = None

    @property
    def rel_error(self) -> float:
        """Relative Frobenius error of the truncation: sqrt(1 - energy kept)."""
        return math.sqrt(max(0.0, 1.0 - self.energy_kept))


def check_method(method: str, value: float) -> None:
    """Raise ``ConfigError`` for an unknown method or an out-of-range value (the CLI and UI call this first)."""
    if method not in METHODS:
        raise ConfigError(f"rank method {method!r} is unknown; use one of {', '.join(METHODS)}.")
    if method == "fixed" and (value < 1 or int(value) != value):
        raise ConfigError(f"rank {value} is not a positive whole number; pass e.g. --rank 8.")
    if method == "ratio" and not value >= 1:
        raise ConfigError(f"singular-value ratio {value} must be >= 1 (keep values >= largest / ratio); "
                          "pass e.g. --ratio 10.")
    if method == "energy" and not 0 < value <= 1:
        raise ConfigError(f"energy {value} must be in (0, 1] (the share of squared singular values to keep); "
                          "pass e.g. --energy 0.9.")


def energy_curve(singular_values: torch.Tensor) -> torch.Tensor:
    """Cumulative energy ``sum(s[:k]^2) / sum(s^2)`` for k = 1..n (fp64; all ones for an all-zero spectrum)."""
    e = singular_values.detach().to(torch.float64).pow(2)
    total = e.sum()
    if total <= 0:
        return torch.ones_like(e)
    return torch.cumsum(e, 0) / total


def choose_rank(singular_values: torch.Tensor, method: str, value: float) -> int:
    """The rank to keep for a descending spectrum ``singular_values``.

    - ``fixed``: ``value`` itself, capped at the number of singular values.
    - ``ratio``: the number of singular values >= ``s_max / value`` (kohya's ``sv_ratio``).
    - ``energy``: the smallest k whose squared singular values hold >= ``value`` of the total, e.g. for
      s = (4, 3, 2, 1) the energies are 16, 9, 4, 1 of 30, so p = 0.8 keeps 2 (25/30) and p = 0.9 keeps 3 (29/30).

    The result is always between 1 and ``len(singular_values)`` (a LoRA module cannot have rank 0).
    """
    check_method(method, value)
    s = singular_values.detach().flatten()
    n = int(s.numel())
    if n == 0:
        raise LoraFormatError("cannot choose a rank for an empty spectrum (a module with no weights).")
    if method == "fixed":
        k = int(value)
    elif method == "ratio":
        s_max = float(s.max())
        k = int((s >= s_max / value).sum()) if s_max > 0 else 1
    else:
        curve = energy_curve(s)
        k = int((curve < value - _ENERGY_TOL).sum()) + 1
    return max(1, min(k, n))


def energy_at(singular_values: torch.Tensor, rank: int) -> float:
    """The share of energy the first ``rank`` singular values hold."""
    curve = energy_curve(singular_values)
    return float(curve[min(rank, curve.numel()) - 1]) if rank > 0 else 0.0


# --------------------------------------------------------------------------- factoring
def _as_matrix(delta: torch.Tensor) -> torch.Tensor:
    if delta.dim() == 2:
        return delta
    if delta.dim() == 4:
        return delta.reshape(delta.shape[0], -1)
    raise LoraFormatError(f"a weight delta must be 2-D (linear) or 4-D (conv), got shape {tuple(delta.shape)}.")


def _svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(mat.to(torch.float32), full_matrices=False)


def _factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
                      shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``U[:, :r] diag(s[:r]) Vh[:r]`` evenly (sqrt(s) on each side, so neither factor dwarfs the other in
    fp16) and give the factors kohya's shapes for ``shape`` (the delta's shape)."""
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).contiguous()
    down = (root[:, None] * vh[:rank]).contiguous()
    if len(shape) == 4:
        down = down.reshape(rank, *shape[1:])
        up = up.reshape(shape[0], rank, 1, 1)
    return up, down


def svd_lowrank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of ``delta`` (Eckart-Young).

    Linear: up (out, r), down (r, in). Conv (out, in, kh, kw): down (r, in, kh, kw), up (out, r, 1, 1).
    ``rank`` is capped at min(out, in*kh*kw).
    """
    mat = _as_matrix(delta)
    rank = max(1, min(int(rank), min(mat.shape)))
    u, s, vh = _svd(mat)
    return _factors_from_svd(u, s, vh, rank, tuple(delta.shape))


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """The spectrum (descending, fp32) of a linear or conv delta."""
    return torch.linalg.svdvals(_as_matrix(delta).to(torch.float32))


@dataclass
class _Factored:
    """A module's delta as ``ratio * up @ down`` with up (out, r) and down (r, in*kh*kw), fp32."""

    up: torch.Tensor
    down: torch.Tensor
    ratio: float
    shape: tuple[int, ...]


def _factored(mod: LoraModule, weight_shape: Sequence[int] | None = None) -> _Factored | None:
    """Exact low-rank factors of a module's delta, without forming it (the kind's ``low_rank``), or None (then
    the delta is formed): for Tucker cores, DoRA, plain diffs, and factors wider than the matrix itself."""
    found = mod.spec.low_rank(mod.tensors, mod.scale)
    if found is None:
        return None
    up, down, ratio = found
    if mod.spec.stores_factors:   # its own factors: no wider than the layer
        return _Factored(up, down, ratio, natural_shape(mod))
    if up.shape[1] > min(up.shape[0], down.shape[1]):
        return None  # the "low-rank" form is wider than the matrix: a plain SVD is cheaper
    shape = tuple(weight_shape or mod.extra.get("weight_shape") or natural_shape(mod))
    if shape[0] != up.shape[0] or math.prod(shape) != up.shape[0] * down.shape[1]:
        raise LoraFormatError(f"module {mod.name}: its factors give a ({up.shape[0]}, {down.shape[1]}) delta, "
                              f"which does not fit the shape {shape}.")
    return _Factored(up, down, ratio, shape)


def _svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``up @ down`` without forming it: with up = Qa Ra and down^T = Qb Rb, the product is
    Qa (Ra Rb^T) Qb^T, so only an r x r matrix is decomposed. Exact, and fast for 1280-wide layers."""
    qa, ra = torch.linalg.qr(up)
    qb, rb = torch.linalg.qr(down.T)
    u_small, s, vh_small = torch.linalg.svd(ra @ rb.T, full_matrices=False)
    return qa @ u_small, s, vh_small @ qb.T


def module_delta_full(mod: LoraModule, weight_shape: Sequence[int] | None = None) -> torch.Tensor:
    """The fp32 delta of any module kind, scale (alpha/rank) included, strength excluded.

    Factored kinds go through ``_factored``; the rest (Tucker cores, plain diffs) through
    ``lora_studio.lora.math`` (DoRA is refused: its delta needs the base weight). ``weight_shape`` (or
    ``mod.extra["weight_shape"]``) reshapes the delta to the layer's shape, e.g. a LoHa conv to 4-D."""
    fac = _factored(mod, weight_shape)
    if fac is not None:
        return (fac.up @ fac.down * fac.ratio).reshape(fac.shape)
    if mod.kind == "full" and len(mod.tensors) == 1:
        return next(iter(mod.tensors.values())).to(torch.float32)
    if "dora_scale" in mod.tensors:
        raise LoraFormatError(f"module {mod.name} is DoRA: its delta depends on the base weight, so it cannot be "
                              "resized or merged on its own. Merge it into a checkpoint with `export` instead.")
    shape = weight_shape if weight_shape is not None else mod.extra.get("weight_shape")
    if shape is None:  # the shape the factors give (a LoHa conv comes out flattened to (out, in*kh*kw))
        return raw_delta(mod).to(torch.float32)
    return module_delta(mod, tuple(shape)).to(torch.float32)


def module_spectrum(mod: LoraModule, weight_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Singular values of a module's effective delta (scale included)."""
    fac = _factored(mod, weight_shape)
    if fac is not None:
        return _svd_of_product(fac.up, fac.down)[1] * abs(fac.ratio)
    return singular_values(module_delta_full(mod, weight_shape))


# --------------------------------------------------------------------------- module operations
def resize_module(mod: LoraModule, method: str, value: float,
                  weight_shape: Sequence[int] | None = None) -> tuple[LoraModule, ResizeStat]:
    """Reduce a module's rank by truncated SVD, the rank chosen by ``choose_rank(method, value)``.

    A classic LoRA/LoCon keeps its alpha/rank ratio (see the module docstring); any other kind (LoHa, LoKr,
    full) becomes a classic LoRA with alpha = rank. For factored kinds the SVD runs on the factors (QR of up
    and down, then an r x r SVD), so even 1280-wide layers take milliseconds.
    """
    fac = _factored(mod, weight_shape)
    if fac is not None:
        u, s, vh = _svd_of_product(fac.up, fac.down)
        shape, ratio, old_rank = fac.shape, fac.ratio, int(fac.down.shape[0])  # LoKr/LoHa: their true rank
    else:
        delta = module_delta_full(mod, weight_shape)
        u, s, vh = _svd(_as_matrix(delta))
        shape, ratio = tuple(delta.shape), 1.0
        old_rank = max(1, int((s > s[0] * 1e-6).sum())) if s.numel() and s[0] > 0 else 1  # numerical rank
    spectrum = s * abs(ratio)
    rank = choose_rank(spectrum, method, value)
    new_up, new_down = _factors_from_svd(u, s, vh, rank, shape)
    new = LoraModule.from_updown(mod.name, new_down, new_up, alpha=float(ratio * rank))
    return new, ResizeStat(mod.name, old_rank, rank, energy_at(spectrum, rank), spectrum)


def concat_merge(modules_with_strengths: Iterable[tuple[LoraModule, float]],
                 weight_shape: Sequence[int] | None = None) -> LoraModule:
    """One module whose delta is exactly ``sum(strength_i * delta_i)``: the ranks are stacked.

    Each module's ``strength * alpha / rank`` is folded into its ``up`` block and the result has alpha = total
    rank (scale 1). Averaging ups and downs separately would add cross terms (up1 @ down2); stacking does not.
    LoHa and LoKr modules stack their exact factors (see ``_factored``); anything else (Tucker cores, plain
    diffs) first becomes a LoRA by an SVD that keeps every non-negligible singular value (exact to fp32 rounding).
    """
    items = list(modules_with_strengths)
    if not items:
        raise LoraFormatError("nothing to merge: no modules were given.")
    ups, downs, name = [], [], items[0][0].name
    shapes = set()
    for mod, strength in items:
        fac = _factored(mod, weight_shape)
        if fac is not None:
            up, down = fac.up * (float(strength) * fac.ratio), fac.down
            shapes.add(fac.shape)
        else:
            delta = module_delta_full(mod, weight_shape) * float(strength)
            shapes.add(tuple(delta.shape))
            u, s, vh = _svd(_as_matrix(delta))
            keep = max(1, int((s > s[0] * 1e-6).sum())) if s.numel() and s[0] > 0 else 1
            up, down = u[:, :keep] * s[:keep], vh[:keep]
        ups.append(up)
        downs.append(down)
    if len(shapes) != 1:
        raise LoraFormatError(f"cannot merge module {name}: the LoRAs give it different shapes {sorted(shapes)}; "
                              "they were made for different base models.")
    shape = shapes.pop()
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    rank = int(down.shape[0])
    if len(shape) == 4:
        down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
    return LoraModule.from_updown(name, down.contiguous(), up.contiguous(), alpha=float(rank))


def svd_merge(modules_with_strengths: Iterable[tuple[LoraModule, float]], method: str, value: float,
              weight_shape: Sequence[int] | None = None) -> tuple[LoraModule, ResizeStat]:
    """The best rank-k approximation (k by ``method``/``value``) of ``sum(strength_i * delta_i)``.

    Implemented as an exact concat merge followed by a resize, so the SVD runs on the stacked factors (via QR)
    instead of the full weight: same result, much less work. ``old_rank`` in the stat is the stacked rank.
    """
    merged = concat_merge(modules_with_strengths, weight_shape)
    return resize_module(merged, method, value)


def extract_delta(w_tuned: torch.Tensor, w_base: torch.Tensor, method: str, value: float,
                  name: str = "") -> tuple[LoraModule, ResizeStat]:
    """A LoRA module approximating ``w_tuned - w_base`` (linear or conv) at the rank ``method``/``value`` picks.

    The difference is taken in fp32. The result has alpha = rank (scale 1).
    """
    if tuple(w_tuned.shape) != tuple(w_base.shape):
        raise LoraFormatError(f"cannot extract {name or 'a module'}: the tuned weight has shape "
                              f"{tuple(w_tuned.shape)} but the base has {tuple(w_base.shape)}; "
                              "the two checkpoints are different architectures.")
    delta = w_tuned.to(torch.float32) - w_base.to(torch.float32)
    u, s, vh = _svd(_as_matrix(delta))
    rank = choose_rank(s, method, value)
    up, down = _factors_from_svd(u, s, vh, rank, tuple(delta.shape))
    mod = LoraModule.from_updown(name, down, up, alpha=float(rank))
    return mod, ResizeStat(name, int(s.numel()), rank, energy_at(s, rank), s)


def summarize(stats: Sequence[ResizeStat]) -> dict[str, float]:
    """Totals over modules: counts, rank range, mean rank, and the energy kept (worst module and overall,
    the overall share weighting each module by its delta's squared norm)."""
    if not stats:
        return {"modules": 0}
    kept = total = 0.0
    for st in stats:
        if st.singular_values is not None:
            e = float(st.singular_values.to(torch.float64).pow(2).sum())
            total += e
            kept += e * st.energy_kept
    ranks = [st.new_rank for st in stats]
    return {
        "modules": len(stats),
        "old_rank_max": max(st.old_rank for st in stats),
        "new_rank_min": min(ranks),
        "new_rank_max": max(ranks),
        "new_rank_mean": sum(ranks) / len(ranks),
        "energy_kept_min": min(st.energy_kept for st in stats),
        "energy_kept_overall": kept / total if total > 0 else 1.0,
    }


def rank_for_energy_summary(spectra: Mapping[str, torch.Tensor], energy: float = 0.9,
                            quantile: float = 0.9) -> tuple[int, int, dict[str, int]]:
    """Per-module ranks needed to keep ``energy``, plus the rank that covers ``quantile`` of the modules and
    the largest one: ``(rank_covering_most, rank_max, per_module)``."""
    per = {name: choose_rank(s, "energy", energy) for name, s in spectra.items()}
    if not per:
        return 0, 0, per
    ordered = sorted(per.values())
    idx = min(len(ordered) - 1, max(0, math.ceil(quantile * len(ordered)) - 1))
    return ordered[idx], ordered[-1], per

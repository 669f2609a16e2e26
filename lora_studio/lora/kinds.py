"""LoRA kinds as objects: one class per kind knows its tensor suffixes, its rank, the shape of its delta, the
delta itself and, where one exists, an exact low-rank factorisation of it.

The reader (``formats``), the delta maths (``math``), the rank tools (``rank``), the mixer and the writers ask
``kind_of(module.kind)`` instead of branching on the kind's name, so a new kind is one class here (peft's
variant objects follow the same idea). Formulas follow LyCORIS and AUTOMATIC1111's built-in Lora extension:

* LoRA / LoCon:  ``delta = up @ down * alpha / r``; conv down (r, in, kh, kw), up (out, r, 1, 1); with a
  Tucker core ``lora_mid`` (r, r, kh, kw): ``delta[o,i,k,l] = sum up[o,n] mid[n,m,k,l] down[m,i]``.
* LoHa: ``delta = (w1a @ w1b) * (w2a @ w2b) * alpha / r`` (r = rows of ``hada_w1_b``); with Tucker cores
  ``hada_t1``/``hada_t2`` each factor is ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)``.
* LoKr: ``delta = kron(w1, w2)`` where each of w1, w2 is stored whole (``lokr_w1``) or factored
  (``lokr_w1_a @ lokr_w1_b``; w2 may have a Tucker core ``lokr_t2``). ``alpha / r`` is applied only when a
  factor is factored (r = rows of the ``_b`` factor), as LyCORIS does; two whole factors mean scale 1.
* full: ``delta = diff``.

DoRA is no kind of its own: a ``dora_scale`` beside any kind's tensors (``math.apply_dora``).
This module works on a module's tensors (a suffix -> tensor mapping) and imports nothing else of ``lora``.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..errors import LoraFormatError

Tensors = Mapping[str, torch.Tensor]
UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"
# Suffixes any kind may carry beside its own.
SHARED_SUFFIXES = ("alpha", "dora_scale")


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild used by LyCORIS: (r, r, kh, kw) core with (r, out) and (r, in) factors."""
    return torch.einsum("ijkl,jr,ip->prkl", _f(t), _f(wb).flatten(1), _f(wa).flatten(1))


def _factor(ts: Tensors, whole: str, a: str, b: str, core: str | None = None) -> torch.Tensor:
    if whole in ts:
        return _f(ts[whole])
    if core is not None and core in ts:
        return _cp(ts[core], ts[a], ts[b])
    return _f(ts[a]).flatten(1) @ _f(ts[b]).flatten(1)


def _factor_shape(ts: Tensors, whole: str, a: str, b: str, core: str | None = None) -> tuple[int, ...]:
    if whole in ts:
        return tuple(ts[whole].shape)
    if core and core in ts:
        return (ts[a].shape[1], ts[b].shape[1], *ts[core].shape[2:])
    return (ts[a].shape[0], math.prod(ts[b].shape[1:]))


class Kind:
    """The interface every kind implements; ``name`` is the string stored in ``LoraModule.kind``."""

    name = ""
    label = ""
    suffixes: tuple[str, ...] = ()                   # the tensors that mark a module as this kind
    # Multiplied factor pairs (a @ b) and the Tucker core that joins them instead when present.
    factor_pairs: tuple[tuple[str, str, str | None], ...] = ()

    def missing(self, ts: Tensors) -> list[str]:
        """The tensors a complete module of this kind needs that ``ts`` lacks."""
        return []

    def rank(self, ts: Tensors) -> int:
        return 0

    def problem(self, ts: Tensors) -> str | None:
        """Why these (complete) tensors make no valid module of this kind, or None."""
        return None

    def refine(self, ts: Tensors) -> str:
        """The kind name to store for these tensors (a LoRA with 4-D factors is a LoCon)."""
        return self.name

    def natural_shape(self, ts: Tensors) -> tuple[int, ...]:
        """The shape of ``raw_delta`` computed from the tensor shapes only (no arithmetic)."""
        raise NotImplementedError

    def raw_delta(self, ts: Tensors, scale: float) -> torch.Tensor:
        """The fp32 delta in the shape the factors give, times ``scale`` (alpha / rank), without DoRA."""
        raise NotImplementedError

    stores_factors = False   # whether ``low_rank`` returns the stored factors themselves (no wider than the layer)
    flattens_convs = False   # whether a conv delta without a Tucker core comes out flattened to (out, in*kh*kw)

    def low_rank(self, ts: Tensors, scale: float) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(up, down, ratio)`` with ``raw_delta == ratio * up @ down`` (flattened to 2-D), exactly and without
        forming the delta, or None when the kind (or this module's layout) has no such form."""
        return None

    def is_one_product(self, ts: Tensors) -> bool:
        """Whether the delta is one ``up @ down`` of the stored factors (the mixer's fast path)."""
        return False


class LoraKind(Kind):
    name, label = "lora", "LoRA"
    suffixes = (DOWN, UP, MID)
    stores_factors = True

    def missing(self, ts: Tensors) -> list[str]:
        return [s for s in (DOWN, UP) if s not in ts]

    def rank(self, ts: Tensors) -> int:
        return int(ts[DOWN].shape[0])

    def problem(self, ts: Tensors) -> str | None:
        down, up, rank = ts[DOWN], ts[UP], int(ts[DOWN].shape[0])
        if rank == 0 or up.dim() < 2 or int(up.shape[1]) != rank:
            return (f"has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}: "
                    f"{'rank 0' if rank == 0 else 'the ranks disagree'}")
        return None

    def refine(self, ts: Tensors) -> str:
        return "locon" if ts[DOWN].dim() == 4 else "lora"

    def natural_shape(self, ts: Tensors) -> tuple[int, ...]:
        up, down = ts[UP], ts[DOWN]
        if MID in ts:
            return (up.shape[0], down.shape[1], *ts[MID].shape[2:])
        return (up.shape[0], *down.shape[1:])

    def raw_delta(self, ts: Tensors, scale: float) -> torch.Tensor:
        # the scale goes into the smallest factor, so the full-size delta is written once (the mixer's hot path)
        up, down = _f(ts[UP]).flatten(1) * scale, _f(ts[DOWN])
        if MID in ts:
            return torch.einsum("nmkl,in,mj->ijkl", _f(ts[MID]), up, down.flatten(1))
        return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])

    def is_one_product(self, ts: Tensors) -> bool:
        return MID not in ts and "dora_scale" not in ts

    def low_rank(self, ts: Tensors, scale: float) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if set(ts) - {DOWN, UP, "alpha"} or (ts[UP].dim() == 4 and tuple(ts[UP].shape[2:]) != (1, 1)):
            return None                               # a Tucker core, DoRA, or a spatial up factor
        return _f(ts[UP]).flatten(1), _f(ts[DOWN]).flatten(1), scale


class LohaKind(Kind):
    name, label = "loha", "LoHa"
    flattens_convs = True
    suffixes = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    factor_pairs = (("hada_w1_a", "hada_w1_b", "hada_t1"), ("hada_w2_a", "hada_w2_b", "hada_t2"))

    def missing(self, ts: Tensors) -> list[str]:
        return [s for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if s not in ts]

    def rank(self, ts: Tensors) -> int:
        return int(ts["hada_w1_b"].shape[0])

    def problem(self, ts: Tensors) -> str | None:
        return f"has rank 0 (hada_w1_b has shape {tuple(ts['hada_w1_b'].shape)})" if self.rank(ts) == 0 else None

    def natural_shape(self, ts: Tensors) -> tuple[int, ...]:
        if "hada_t1" in ts:
            return (ts["hada_w1_a"].shape[1], ts["hada_w1_b"].shape[1], *ts["hada_t1"].shape[2:])
        return (ts["hada_w1_a"].shape[0], math.prod(ts["hada_w1_b"].shape[1:]))

    def raw_delta(self, ts: Tensors, scale: float) -> torch.Tensor:
        w1 = _factor(ts, "", "hada_w1_a", "hada_w1_b", "hada_t1") * scale
        return w1 * _factor(ts, "", "hada_w2_a", "hada_w2_b", "hada_t2")

    def low_rank(self, ts: Tensors, scale: float) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        # (w1a@w1b) * (w2a@w2b) = up @ down with the row-wise Khatri-Rao products up[o,(i,j)] = w1a[o,i] w2a[o,j]
        # and down[(i,j),n] = w1b[i,n] w2b[j,n] (rank r1*r2)
        if {"hada_t1", "hada_t2", "dora_scale"} & set(ts):
            return None
        w1a, w1b, w2a, w2b = (_f(ts[k]).flatten(1) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        up = (w1a[:, :, None] * w2a[:, None, :]).flatten(1)
        down = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)
        return up * scale, down, 1.0


def _kron_side(ts: Tensors, stem: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoKr factor as ``A @ B``: its stored ``_a``/``_b`` pair, or a whole matrix times an identity."""
    if stem in ts:
        w = _f(ts[stem]).flatten(1)
        eye = torch.eye(min(w.shape), dtype=torch.float32)
        return (w, eye) if w.shape[1] <= w.shape[0] else (eye, w)
    return _f(ts[stem + "_a"]).flatten(1), _f(ts[stem + "_b"]).flatten(1)


class LokrKind(Kind):
    name, label = "lokr", "LoKr"
    flattens_convs = True
    suffixes = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    factor_pairs = (("lokr_w1_a", "lokr_w1_b", None), ("lokr_w2_a", "lokr_w2_b", "lokr_t2"))

    def missing(self, ts: Tensors) -> list[str]:
        return [f"{w} (or {w}_a and {w}_b)" for w in ("lokr_w1", "lokr_w2")
                if w not in ts and not (f"{w}_a" in ts and f"{w}_b" in ts)]

    def rank(self, ts: Tensors) -> int:
        for b in ("lokr_w1_b", "lokr_w2_b"):
            if b in ts:
                return int(ts[b].shape[0])
        return 0

    def natural_shape(self, ts: Tensors) -> tuple[int, ...]:
        s1 = _factor_shape(ts, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
        s2 = _factor_shape(ts, "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        return (s1[0] * s2[0], s1[1] * s2[1], *s2[2:])

    def raw_delta(self, ts: Tensors, scale: float) -> torch.Tensor:
        w1 = _factor(ts, "lokr_w1", "lokr_w1_a", "lokr_w1_b") * scale
        w2 = _factor(ts, "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        if w2.dim() == 4:                             # a conv weight: the product reshapes to (out, in, kh, kw)
            w1 = w1.reshape(*w1.shape, 1, 1)
        return torch.kron(w1.contiguous(), w2.contiguous())

    def low_rank(self, ts: Tensors, scale: float) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        # kron(A1@B1, A2@B2) = kron(A1, A2) @ kron(B1, B2) (the mixed-product rule; rank r1*r2)
        if {"lokr_t2", "dora_scale"} & set(ts):
            return None
        a1, b1 = _kron_side(ts, "lokr_w1")
        a2, b2 = _kron_side(ts, "lokr_w2")
        return torch.kron(a1, a2) * scale, torch.kron(b1, b2), 1.0


class FullKind(Kind):
    name, label = "full", "Full diff"
    suffixes = ("diff",)

    def natural_shape(self, ts: Tensors) -> tuple[int, ...]:
        return tuple(ts["diff"].shape)

    def raw_delta(self, ts: Tensors, scale: float) -> torch.Tensor:
        d = _f(ts["diff"])
        return d if scale == 1.0 else d * scale


KINDS: dict[str, Kind] = {k.name: k for k in (LoraKind(), LohaKind(), LokrKind(), FullKind())}
KINDS["locon"] = KINDS["lora"]
# Which kind each suffix marks (None: a suffix any kind may carry).
SUFFIX_KINDS: dict[str, str | None] = {s: k.name for k in (KINDS["lora"], KINDS["loha"], KINDS["lokr"], KINDS["full"])
                                       for s in k.suffixes} | dict.fromkeys(SHARED_SUFFIXES)
LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "full": "Full diff", "dora": "DoRA"}


def kind_of(name: str) -> Kind:
    """The kind object for a ``LoraModule.kind`` string."""
    try:
        return KINDS[name]
    except KeyError:
        raise LoraFormatError(f"unknown LoRA kind {name!r}; known: {', '.join(KINDS)}.") from None

"""Apply several LoRAs at once to a loaded pipeline, each at its own strength, and re-weight live.

``LoraMixer`` reads each file once and keeps its low-rank factors in memory. ``apply()`` writes

    W = W0 + sum_i  s_i * b_i(module) * dW_i          (computed in fp32, stored in the weight's dtype)

into the pipeline's module weights, where ``s_i`` is the LoRA's UNet strength (``strength``) or text-encoder
strength (``te_strength``, defaulting to ``strength``), ``b_i`` its per-block weight and ``dW_i`` the module's
delta (``lora.math.module_delta``: up@down*alpha/r, LoHa, LoKr, DoRA, ...). Summing the deltas is the exact
mix (averaging up and down factors separately would add cross terms). Calling ``apply()`` again after
``set_strength`` re-weights from the kept factors and the kept originals: no file is read and nothing drifts.
``restore()`` copies the original tensors back, so the base weights are bit-identical afterwards.

``apply()`` refuses (``ExportError``, naming the layer and the file) a mix whose result is NaN/inf in fp32 or in
the weight's dtype, and any LoRA whose delta at its strength has a Frobenius norm over ``limits.MAX_DELTA_RATIO`` times
that of the weight it changes: a delta as large as the weight already replaces the layer rather than adjusting
it, so no working LoRA comes near that, while a broken alpha (3e38) or a typo'd strength (1e7) does. A refused
apply leaves every weight exactly as it was before the call.

Where W0 is kept (on the weight's device when there is room, else in CPU memory) is ``originals``.

Written by hand rather than through diffusers' ``set_adapters``/``fuse_lora`` because those reject LoHa/LoKr
and cannot weight blocks of a kohya LoRA; a test checks this module against diffusers' own fuse for LoRA.

Per-block weights are ``blocks.UnetBlocks``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ConfigError, ExportError, LoraFormatError, LoraStudioError
from ..family import Family, family_of_pipeline, require_same_family
from ..finite import all_finite
from ..lora.formats import LoraFile, LoraModule, read_lora
from ..lora.keys import match_modules, pipeline_components
from ..lora.math import module_delta
from .blocks import UnetBlocks
from .limits import OriginalSizes, norm64, product_norm
from .originals import keep_in_place, keep_original, put_back

# A LoRA whose delta (at its strength) is larger than this many times the weight it changes would wreck the model.
@dataclass
class MixEntry:
    """One LoRA in the mix. ``matched`` counts the modules applied; ``unmatched`` names those that are not."""

    name: str
    path: Path | None
    strength: float
    te_strength: float | None
    block_weights: dict[str, float]
    matched: int
    unmatched: list[str]
    kind: str
    family: Family | None
    lora: LoraFile = field(repr=False, compare=False)
    targets: dict[str, tuple[str, str]] = field(repr=False, compare=False, default_factory=dict)

    @property
    def effective_te_strength(self) -> float:
        return self.strength if self.te_strength is None else self.te_strength


class LoraMixer:
    """Several LoRAs on one pipeline; see the module docstring for the formula and the block-weight keys."""

    def __init__(self, pipe, keep_originals_on_device: bool | None = None):
        """``keep_originals_on_device``: keep W0 of the touched weights on the GPU (True), in CPU memory (False),
        or decide by the free memory at each first apply (None; see ``originals``)."""
        self.pipe = pipe
        self.keep_originals_on_device = keep_originals_on_device
        self.components = pipeline_components(pipe)
        self.family = family_of_pipeline(pipe)
        self._entries: dict[str, MixEntry] = {}
        self._originals: dict[tuple[str, str], torch.Tensor] = {}
        self._written: dict[tuple[str, str], tuple] = {}  # what apply() last wrote into each weight
        # (id(module), device, dtype) -> (module, up, down, bound, norm bound)
        self._factors_cache: dict[tuple, tuple] = {}
        self._sizes = OriginalSizes()  # what is known of each W0's size: the yardstick of a LoRA's change
        self.blocks = UnetBlocks(self.components.get("unet"))

    # ------------------------------------------------------------------ entries
    @property
    def entries(self) -> list[MixEntry]:
        return list(self._entries.values())

    def add(self, source: str | os.PathLike | LoraFile, name: str | None = None, strength: float = 1.0,
            te_strength: float | None = None, block_weights: dict[str, float] | None = None,
            allow_partial: bool = False) -> str:
        """Read (once), check family and keys, and keep a LoRA for the mix. Returns its name in the mix.

        Raises ``FamilyMismatchError`` for a LoRA of another family and ``LoraFormatError`` when some of its
        modules match nothing in the pipeline, unless ``allow_partial`` (the entry then lists them).
        Nothing changes in the pipeline until ``apply()``.
        """
        lf = source if isinstance(source, LoraFile) else read_lora(source)
        if lf.family is not None:
            require_same_family(f"LoRA {lf.path.name}", lf.family, self.family)
        result = match_modules(lf, self.pipe)
        if result.unmatched and not allow_partial:
            shown = ", ".join(result.unmatched[:8]) + (" ..." if len(result.unmatched) > 8 else "")
            raise LoraFormatError(
                f"{lf.path}: {len(result.unmatched)} of {len(lf.modules)} modules match no layer of the loaded "
                f"model: {shown}. The LoRA is for another model, or uses names LoRA Studio does not know; "
                "pass allow_partial=True (CLI: --allow-partial) to apply the rest anyway.")
        if lf.embeddings and not allow_partial:
            raise LoraFormatError(f"{lf.path} also holds token embeddings ({', '.join(lf.embeddings)}), which "
                                  "the mixer does not apply; pass allow_partial=True to apply the rest anyway.")
        base = name or lf.path.stem
        unique, n = base, 2
        while unique in self._entries:
            unique, n = f"{base}_{n}", n + 1
        blocks = self.blocks.check(block_weights or {})
        unmatched = list(result.unmatched) + [f"<embedding {t}>" for t in lf.embeddings]
        self._entries[unique] = MixEntry(unique, lf.path, float(strength), None if te_strength is None else
                                         float(te_strength), blocks, len(result.matched), unmatched,
                                         ", ".join(lf.kinds), lf.family, lf, dict(result.matched))
        return unique

    def set_strength(self, name: str, unet: float | None = None, te: float | None = None,
                     blocks: dict[str, float] | None = None, *, te_follows_unet: bool = False) -> None:
        """Change a LoRA's UNet strength, text-encoder strength and/or block weights (call ``apply()`` after).

        ``None`` leaves a value as it is; ``te_follows_unet=True`` makes the text-encoder strength follow the
        UNet strength again (as when the LoRA was added without ``te_strength``).
        """
        e = self._get(name)
        if te_follows_unet and te is not None:
            raise ConfigError(f"{name}: give te={te} or te_follows_unet=True, not both.")
        if unet is not None:
            e.strength = float(unet)
        if te is not None:
            e.te_strength = float(te)
        elif te_follows_unet:
            e.te_strength = None
        if blocks is not None:
            e.block_weights = self.blocks.check(blocks)

    def remove(self, name: str) -> None:
        """Drop a LoRA from the mix (its modules go back to W0 at the next ``apply()``)."""
        self._get(name)
        del self._entries[name]
        live = {id(m) for e in self._entries.values() for m in e.lora.modules.values()}
        self._factors_cache = {k: v for k, v in self._factors_cache.items() if k[0] in live}

    def _get(self, name: str) -> MixEntry:
        if name not in self._entries:
            raise ConfigError(f"no LoRA named {name!r} in the mix; the mix holds: "
                              f"{', '.join(self._entries) or 'nothing'}.")
        return self._entries[name]

    # ------------------------------------------------------------------ weights
    def coefficient(self, entry: MixEntry, component: str, module_name: str,
                    strengths: tuple[float, float] | None = None) -> float:
        """The factor this entry's delta gets on one module: strength x block weight, or the TE strength.
        ``strengths`` (unet, te) stand in for the entry's own, as a comparison cell asks."""
        unet, te = strengths if strengths is not None else (entry.strength, entry.effective_te_strength)
        weight = self.blocks.weight(entry.block_weights, component, module_name)
        return (unet if component == "unet" else te) * weight

    def _weight(self, key: tuple[str, str]) -> torch.Tensor:
        comp, mname = key
        return self.components[comp].get_submodule(mname).weight

    def contributions(self, strengths: Mapping[str, tuple[float, float]] | None = None
                      ) -> dict[tuple[str, str], list[tuple[float, LoraModule]]]:
        """For each touched (component, module): the (coefficient, module) pairs of the current mix, or of the
        mix at ``strengths`` (entry name -> (unet, te); entries not named keep their own)."""
        out: dict[tuple[str, str], list[tuple[float, LoraModule]]] = {}
        for e in self._entries.values():
            these = strengths.get(e.name) if strengths is not None else None
            for kname, key in e.targets.items():
                out.setdefault(key, []).append((self.coefficient(e, *key, these), e.lora.modules[kname]))
        return out

    def _factors(self, mod: LoraModule, device: torch.device, dtype: torch.dtype):
        """``(up * alpha / r, down, bound, norm_bound)`` as 2-D tensors on ``device`` for a module whose delta is
        one matrix product (LoRA, LoCon without a Tucker core, not DoRA), kept for the next ``apply()``; ``bound``
        caps any entry of ``up @ down`` (Cauchy-Schwarz: the largest row norm of up times the largest column norm
        of down) and ``norm_bound`` its Frobenius norm (``||up|| ||down||``). ``None`` for other kinds, which
        take ``module_delta``."""
        if not mod.spec.is_one_product(mod.tensors):
            return None
        key = (id(mod), device, dtype)
        hit = self._factors_cache.get(key)
        if hit is not None and hit[0] is mod:  # the module itself is held, so its id is not reused meanwhile
            return hit[1:]
        up = mod.tensors["lora_up.weight"].to(device=device, dtype=torch.float32).flatten(1) * mod.scale
        down = mod.tensors["lora_down.weight"].to(device=device, dtype=torch.float32).flatten(1)
        if up.numel() and down.numel():
            rows, cols = up.norm(dim=1), down.norm(dim=0)  # ||up||_F is the norm of its row norms
            bound, norm_bound = torch.stack([rows.max() * cols.max(), rows.norm() * cols.norm()]).tolist()
        else:
            bound, norm_bound = 0.0, 0.0
        up, down = up.to(dtype), down.to(dtype)
        self._factors_cache[key] = (mod, up, down, bound, norm_bound)
        return up, down, bound, norm_bound

    def _apply_products(self, key, param: torch.Tensor, w0: torch.Tensor, terms) -> bool:
        """Write ``W0 + sum c * up @ down`` with ``addmm`` straight into ``param`` when every term is one low-rank
        product and the result provably stays finite; returns False to leave the layer to the general path.
        Raises ``ExportError`` (writing nothing) for a term over ``limits.MAX_DELTA_RATIO`` times the weight.

        No full-size delta is made and no full-size ``isfinite`` pass is needed (the bound rules overflow out),
        which is what makes apply and strength changes cheap. fp32 weights are computed exactly as the general
        path does (fp32). bf16 weights with one LoRA multiply the factors in bf16, about four times faster on
        CPUs with bf16 matrix units; the product is rounded to bf16 once, an error of under one bf16 step of
        the weight for any delta smaller than the weight. Other cases sum into an fp32 copy and round once.
        """
        if param.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not param.is_contiguous():
            return False
        mm_dtype = torch.bfloat16 if param.dtype == torch.bfloat16 and len(terms) == 1 else torch.float32
        prods = [(c, self._factors(m, param.device, mm_dtype)) for c, m in terms]
        rows = param.shape[0]
        cols = param.numel() // rows if rows else 0
        if any(f is None or f[0].shape[0] != rows or f[1].shape[1] != cols for _, f in prods):
            return False
        bound = sum(abs(c) * f[2] for c, f in prods)
        if param.dtype == torch.float16:
            if key not in self._sizes.absmax:  # the weight became fp16 after W0 was measured: no bound for it
                return False
            bound += self._sizes.absmax[key]
        if not bound < torch.finfo(param.dtype).max / 4:  # also False for nan/inf
            return False
        for (c, f), (_, m) in zip(prods, terms):  # the cheap bound first, the exact norm only near the limit
            if not self._sizes.within_limit(key, self._originals[key], abs(c) * f[3]):
                size = abs(c) * product_norm(m)
                if not self._sizes.within_limit(key, self._originals[key], size):
                    raise self._sizes.too_large(key, c, m, size, self._source(m))
        out = param.view(rows, cols)
        base = w0.to(param.device).view(rows, cols)
        if param.dtype == mm_dtype:
            (c0, (u0, d0, *_)), rest = prods[0], prods[1:]
            torch.addmm(base, u0, d0, alpha=c0, out=out)
            for c, (u, d, *_) in rest:
                out.addmm_(u, d, alpha=c)
        else:
            acc = base.to(torch.float32, copy=True)
            for c, (u, d, *_) in prods:
                acc.addmm_(u, d, alpha=c)
            out.copy_(acc)
        return True

    @torch.no_grad()
    def apply(self, strengths: Mapping[str, tuple[float, float]] | None = None) -> None:
        """Write ``W0 + sum s_i b_i dW_i`` into every touched weight (and W0 back into weights no longer touched).

        ``strengths`` (entry name -> (unet, te)) renders the mix at other strengths without changing the
        entries' own (what a comparison cell does); the strengths stay the user's, set by ``set_strength``.
        Only weights whose terms changed since the last ``apply()`` are recomputed, so moving one LoRA's
        text-encoder strength or one block weight costs only those layers. The weights are assumed to be
        changed by nobody else in between (``restore()`` first if they were). A refused mix (see the module
        docstring) raises ``ExportError`` and leaves every weight as it was before the call."""
        contribs = self.contributions(strengths)
        for key, items in contribs.items():  # before anything is written: add_ raises RuntimeError beyond float32
            for coeff, _ in items:
                if not abs(coeff) <= torch.finfo(torch.float32).max:
                    raise ExportError(f"strength {coeff:g} on {key[0]}.{key[1]} is beyond float32's range; "
                                      "lower the strengths (the weights were left as they were).")
        fresh = {key: self._weight(key) for key in contribs if key not in self._originals}
        in_place = keep_in_place(list(fresh.values()), self.keep_originals_on_device)
        for key, param in fresh.items():
            self._originals[key] = keep_original(param, in_place[param.device])
        before = dict(self._written)
        try:
            self._sizes.measure({key: self._originals[key] for key in fresh})
            self._write(contribs)
        except LoraStudioError:  # a refused mix: what this call wrote goes back to what was there
            self._roll_back(before)
            raise
        finally:  # a layer that was never written (an error came first) gets its own tensor back
            for key in fresh:
                if key not in self._written:
                    put_back(self._weight(key), self._originals.pop(key))

    def _source(self, mod: LoraModule) -> str:
        """The file (or mix name) a module comes from, for messages."""
        for e in self._entries.values():
            if e.lora.modules.get(mod.name) is mod:
                return e.path.name if e.path is not None else e.name
        return mod.name

    def _write(self, contribs) -> None:
        pending = []  # general-path checks, left on the device and read with one host sync after the loop
        for key, w0 in self._originals.items():
            terms = [(c, m) for c, m in contribs.get(key, []) if c != 0.0]
            last = self._written.get(key)  # holds the modules themselves, so an id is never reused
            if last is not None and len(last) == len(terms) and all(
                    c0 == c1 and m0 is m1 for (c0, m0), (c1, m1) in zip(last, terms)):
                continue  # unchanged since the last apply(): nothing to compute
            check = self._write_one(key, w0, terms)
            if check is not None:
                pending.append(check)
        self._check(pending)

    def _write_one(self, key, w0: torch.Tensor, terms: list) -> tuple | None:
        """Write one weight and record its terms; returns the general path's on-device checks (or None)."""
        param = self._weight(key)
        self._written.pop(key, None)  # until written, the weight does not hold these terms
        if not terms:
            param.copy_(w0)
        elif not self._apply_products(key, param, w0, terms):
            acc = w0.to(device=param.device, dtype=torch.float32, copy=True)
            sizes = []
            for coeff, mod in terms:
                delta = module_delta(mod, tuple(w0.shape), base=w0, device=param.device)
                sizes.append(torch.linalg.vector_norm(delta))  # fp32 is faster; _check redoes an overflow in fp64
                acc.add_(delta, alpha=coeff)
            new = acc.to(param.dtype)
            param.copy_(new)
            self._written[key] = tuple(terms)
            # one sum, not isfinite().all(): a finite sum proves every element finite (see finite.py)
            return key, terms, torch.stack([*sizes, new.sum(dtype=torch.float32)])
        self._written[key] = tuple(terms)
        return None

    def _check(self, pending: list) -> None:
        """Raise for the first general-path weight whose LoRA delta is too large or whose result is NaN/inf."""
        if not pending:
            return
        by_device: dict[torch.device, list] = {}
        for item in pending:
            by_device.setdefault(item[2].device, []).append(item)
        for items in by_device.values():
            values = torch.cat([v for *_, v in items]).tolist()
            at = 0
            for key, terms, v in items:
                got, at = values[at:at + len(v)], at + len(v)
                for (coeff, mod), norm in zip(terms, got):
                    size = abs(coeff) * norm
                    if not self._sizes.within_limit(key, self._originals[key], size):
                        if not math.isfinite(size):  # NaN/inf in the delta, or a norm beyond fp32: measure in fp64
                            w0 = self._originals[key]
                            size = abs(coeff) * float(norm64(module_delta(mod, tuple(w0.shape), base=w0)))
                        if not self._sizes.within_limit(key, self._originals[key], size):
                            raise self._sizes.too_large(key, coeff, mod, size, self._source(mod))
                if not math.isfinite(got[-1]) and not all_finite(self._weight(key)):
                    param = self._weight(key)
                    files = ", ".join(dict.fromkeys(self._source(m) for _, m in terms))
                    raise ExportError(f"the mix gives values out of {param.dtype}'s range in {key[0]}.{key[1]} "
                                      f"(LoRAs: {files}); lower the strengths. Nothing was applied; the weights "
                                      "were left as they were.")

    def _roll_back(self, before: dict) -> None:
        """Put back what ``apply()`` found: W0, or the earlier mix recomputed from its terms (the same arithmetic
        on the same inputs, so the same bits), for each weight this call wrote."""
        for key, terms in list(self._written.items()):
            if before.get(key) is not terms:
                if key in before:
                    self._write_one(key, self._originals[key], list(before[key]))
                else:
                    del self._written[key]  # a weight first touched by this call: apply() puts W0 back
        for key, terms in before.items():  # written as far as clearing, then refused
            if key not in self._written:
                self._write_one(key, self._originals[key], list(terms))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every touched weight back exactly as it was before the first ``apply()``."""
        for key, w0 in self._originals.items():
            put_back(self._weight(key), w0)
        self._originals.clear()
        self._written.clear()
        self._sizes.clear()

    # ------------------------------------------------------------------ reporting
    def report(self) -> str:
        if not self._entries:
            return f"No LoRAs in the mix (base model: {self.family.label})."
        lines = [f"Mix on a {self.family.label} base model: {len(self._entries)} LoRA(s)"]
        for e in self._entries.values():
            total = e.matched + len(e.unmatched)
            te = "" if e.te_strength is None else f", text encoder {e.te_strength:g}"
            blocks = "" if not e.block_weights else ", blocks " + ", ".join(f"{k}={v:g}" for k, v in e.block_weights.items())
            fam = e.family.label if e.family else "family unknown"
            lines.append(f"- {e.name} ({e.kind}; {fam}): strength {e.strength:g}{te}{blocks}; "
                         f"{e.matched}/{total} modules matched, {len(e.unmatched)} unmatched")
            for u in e.unmatched[:20]:
                lines.append(f"    unmatched: {u}")
            if len(e.unmatched) > 20:
                lines.append(f"    ... and {len(e.unmatched) - 20} more unmatched")
        return "\n".join(lines)

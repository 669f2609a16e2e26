"""Read and write LoRA files.

``read_lora(path)`` reads every common layout into one in-memory shape (``LoraFile`` of ``LoraModule`` keyed by
kohya names): kohya/Civitai LoRA and LoCon, LyCORIS LoHa/LoKr (all factor forms) and DoRA, diffusers/peft
(``unet.``/``text_encoder.``/``text_encoder_2.`` with ``lora_A``/``lora_B`` or older ``lora.down``/``lora.up``),
SDXL ``lora_te1_``/``lora_te2_``. It only reads: mapping onto a model is ``keys.match_modules``, the math is
``math.module_delta``. Written by hand because diffusers' reader rejects LoHa/LoKr and returns no factors.
The writer is ``writer.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..errors import FamilyMismatchError, LoraFormatError
from ..finite import nonfinite_names
from ..family import Family, family_from_context_dim, family_from_metadata
from ..fileio import load_safetensors, refuse_pickle
from .kinds import LABELS, SUFFIX_KINDS, kind_of
from .math import natural_shape
from .module import LoraModule
from .keys import (KOHYA_PREFIXES, cloneofsimo_text_names, cloneofsimo_unet_names, component_of_kohya_name,
                   kohya_module_name, kohya_prefix_for, split_peft_key)


UNSUPPORTED_SUFFIXES = {"oft_blocks": "LyCORIS OFT", "oft_diag": "LyCORIS OFT", "oft_R": "LyCORIS BOFT",
                        "a1.weight": "LyCORIS GLoRA", "b1.weight": "LyCORIS GLoRA", "on_input": "LyCORIS (IA)^3",
                        "diff_b": "LyCORIS bias diff", "bias_indices": "LyCORIS sparse bias"}
# Key fragments of LoRAs for model families LoRA Studio does not handle.
FOREIGN_MARKERS = (
    ("single_transformer_blocks", "FLUX"), ("double_blocks", "FLUX"), ("single_blocks", "FLUX"),
    ("lora_transformer_", "FLUX/SD3 (a transformer model)"), ("lora_te3_", "SD3"),
    ("joint_blocks", "SD3"), ("transformer.transformer_blocks", "a transformer (DiT) model such as SD3 or FLUX"),
)


@dataclass
class LoraFile:
    """One LoRA file, read: modules keyed by kohya name, the header metadata, the layout and the base family.

    ``format`` is "kohya" (kohya/Civitai/LyCORIS keys), "peft" (diffusers/peft keys) or "cloneofsimo".
    ``embeddings`` holds token vectors some files carry (kohya ``bundle_emb.*``, cloneofsimo ``<s1>``): they are
    reported, not applied. ``notes`` says what the reader had to decide.
    """

    path: Path
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    format: str
    family: Family | None
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        """Kinds present, as labels ("LoRA", "LoCon", "LoHa", "LoKr", "DoRA", ...)."""
        found = {m.kind for m in self.modules.values()}
        labels = [LABELS[k] for k in LABELS if k in found]
        if any("dora_scale" in m.tensors for m in self.modules.values()):
            labels.append("DoRA")
        return labels


def _fail(path, what: str, keys: list[str]) -> LoraFormatError:
    shown = ", ".join(keys[:6]) + (f" (and {len(keys) - 6} more)" if len(keys) > 6 else "")
    advice = "" if "again" in what else " Check that it is a LoRA for Stable Diffusion 1.x/2.x/XL; if it is, it " \
        "is damaged or of a variant LoRA Studio does not read: download or export it again."
    return LoraFormatError(f"{path}: {what}: {shown}.{advice}")


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file of any supported layout. Raises ``LoraFormatError`` (naming keys) for unknown schemes,
    incomplete modules, rank 0 or non-finite weights, and ``FamilyMismatchError`` for non-SD families."""
    p = Path(path)
    refuse_pickle(p)
    tensors, metadata = load_safetensors(p)
    if not tensors:
        raise LoraFormatError(f"{p} holds no tensors: it is not a LoRA file.")
    _refuse_foreign(p, tensors, metadata)
    keys = list(tensors)
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        modules, embeddings, fmt = *_group_kohya(p, tensors), "kohya"
    elif any(split_peft_key(k) for k in keys):
        modules, embeddings, fmt = _group_peft(p, tensors, metadata), {}, "peft"
    elif any(re.fullmatch(r"(unet|text_encoder):\d+:(up|down)", k) for k in keys):
        modules, embeddings, fmt = *_group_cloneofsimo(p, tensors, metadata), "cloneofsimo"
    else:
        raise _fail(p, "no key follows a known LoRA scheme (kohya 'lora_unet_'/'lora_te_' or diffusers/peft "
                       "'unet.'/'text_encoder.' with lora_A/lora_B); first keys", sorted(keys))
    nonfinite = nonfinite_names((f"{m.name}.{s}", t) for m in modules.values() for s, t in m.tensors.items())
    if nonfinite:
        raise _fail(p, "non-finite weights (NaN or inf); the file is broken, download or export it again",
                    nonfinite)
    lf = LoraFile(p, modules, metadata, fmt, None, embeddings)
    if fmt == "kohya" and _peft_dora_layout(metadata):
        legacy = [m for m in modules.values() if "dora_scale" in m.tensors and m.tensors["dora_scale"].dim() > 2]
        for mod in legacy:
            _dora_per_output(mod)
        if legacy:
            lf.notes.append("DoRA magnitudes in peft's conv layout (1, out, 1, 1), as LoRA Studio's trainer wrote "
                            "them before it wrote LyCORIS's (out, 1, 1, 1): read per output")
    if fmt == "cloneofsimo":
        lf.notes.append("cloneofsimo layout: modules named by position in the SD UNet/CLIP order, checked "
                        "against their shapes; token vectors are not applied")
    lf.family = _family(lf)
    return lf


def _peft_dora_layout(metadata: Mapping[str, str]) -> bool:
    """Whether a kohya file is a DoRA LoRA from LoRA Studio's trainer (``ss_network_args`` with its
    ``unet_targets`` and ``dora``). Before it wrote LyCORIS's ``(out, 1, 1, 1)``, that trainer stored peft's conv
    magnitude ``(1, out, 1, 1)``, which is per output; in other kohya files ``(1, n, 1, 1)`` is per input."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        return False
    return isinstance(args, dict) and "unet_targets" in args and args.get("dora") is True


def _dora_per_output(mod: LoraModule) -> None:
    """Reshape a magnitude known to be per output row into LyCORIS's ``(out, 1, ...)`` (see ``math``)."""
    nat = natural_shape(mod)
    m = mod.tensors["dora_scale"]
    if m.numel() == nat[0]:
        mod.tensors["dora_scale"] = m.reshape(nat[0], *[1] * (len(nat) - 1))


def _refuse_foreign(p: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    for marker, label in FOREIGN_MARKERS:
        hits = [k for k in tensors if marker in k]
        if hits:
            claimed = family_from_metadata(dict(metadata))
            claim = (f" Its metadata claims {claimed.label}, but its keys and shapes say {label}; the keys win."
                     if claimed else "")
            raise FamilyMismatchError(
                f"{p} is a LoRA for {label} (keys like {hits[0]}), not for Stable Diffusion 1.x/2.x/XL.{claim} "
                "LoRA Studio mixes SD 1.x, SD 2.x and SDXL LoRAs only: use it with a tool for that model.")


def _split_modules(p: Path, tensors: Mapping[str, torch.Tensor], names: Mapping[str, tuple[str, str]]
                   ) -> dict[str, LoraModule]:
    """Build modules from ``{key: (kohya name, kohya suffix)}``; checks completeness, shapes and rank."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, (name, suffix) in names.items():
        groups.setdefault(name, {})[suffix] = tensors[key]
    unsupported = [f"{n}.{s}" for n, g in groups.items() for s in g if s in UNSUPPORTED_SUFFIXES]
    if unsupported:
        kind = UNSUPPORTED_SUFFIXES[unsupported[0].split(".", 1)[1]]
        raise _fail(p, f"uses {kind}, which LoRA Studio does not apply; keys", unsupported)
    unknown = [f"{n}.{s}" for n, g in groups.items() for s in g if s not in SUFFIX_KINDS]
    if unknown:
        raise _fail(p, "keys with suffixes of no known LoRA kind", unknown)
    return {name: _build_module(p, name, g) for name, g in sorted(groups.items())}


def _build_module(p: Path, name: str, g: dict[str, torch.Tensor]) -> LoraModule:
    kinds = {SUFFIX_KINDS[s] for s in g} - {None}
    if len(kinds) != 1:
        what = "only alpha/dora_scale, no weights" if not kinds else f"tensors of several kinds ({sorted(kinds)})"
        raise _fail(p, f"module {name} has {what}; keys", [f"{name}.{s}" for s in g])
    kind = kinds.pop()
    alpha = _alpha(p, name, g["alpha"]) if "alpha" in g else None
    tens = {s: t for s, t in g.items() if s != "alpha"}
    spec = kind_of(kind)
    missing = spec.missing(g)
    if missing:
        have = ", ".join(f"{name}.{s}" for s in g)
        raise LoraFormatError(f"{p}: module {name} is incomplete: it has {have} but no "
                              f"{', '.join(missing)}. The file is damaged or of an unknown variant: download "
                              "or export it again.")
    _check_factors(p, name, g, spec.factor_pairs)
    why = spec.problem(g)
    if why:
        raise LoraFormatError(f"{p}: module {name} {why}. The file is damaged: download or export it again.")
    return LoraModule(name, spec.refine(g), tens, alpha, spec.rank(g))


def _alpha(p: Path, name: str, t: torch.Tensor) -> float:
    """A module's alpha: exactly one finite real number (a float or integer tensor of any shape with one element;
    kohya writes a 0-d scalar). A vector is refused rather than read as its first element."""
    real = t.dtype != torch.bool and not t.is_complex()
    value = float(t.reshape(-1)[0].float()) if real and t.numel() == 1 else float("nan")
    if not math.isfinite(value):
        shown = (t.float() if t.is_floating_point() else t).reshape(-1)[:8].tolist()
        count = f"{t.numel()} value{'s' if t.numel() != 1 else ''}"
        raise LoraFormatError(f"{p}: {name}.alpha holds {count} of {str(t.dtype).removeprefix('torch.')} "
                              f"{shown}{' ...' if t.numel() > 8 else ''}; alpha must be one finite number. The "
                              "file is damaged: download or export it again.")
    return value


def _check_factors(p: Path, name: str, g: dict[str, torch.Tensor],
                   factor_pairs: tuple[tuple[str, str, str | None], ...]) -> None:
    """Factors are 2-D (4-D for convolutions) and multiplied factors fit, so a damaged file is refused here
    rather than failing inside the mixer's matrix products."""
    def bad(why: str) -> LoraFormatError:
        return LoraFormatError(f"{p}: module {name} {why}. The file is damaged or of an unknown variant: "
                               "download or export it again.")
    for s, t in g.items():  # integers, bools and complex numbers would be converted to float and applied
        if s != "alpha" and not t.is_floating_point():
            raise LoraFormatError(f"{p}: {name}.{s} is {str(t.dtype).removeprefix('torch.')}, but LoRA weights are "
                                  "floating-point numbers (fp16, bf16, fp32, fp64 or fp8). The file is damaged or "
                                  "not a LoRA: download or export it again.")
    for s, t in g.items():
        if s not in ("alpha", "dora_scale", "diff") and t.dim() not in (2, 4):
            raise bad(f"has {s} of shape {tuple(t.shape)}, but a LoRA factor has 2 dimensions (4 for a convolution)")
    for a, b, core in factor_pairs:
        if a in g and b in g:
            ta, tb = g[a], g[b]
            fits = (g[core].shape[0] == ta.shape[0] and g[core].shape[1] == tb.shape[0]) if core in g \
                else ta.shape[1] == tb.shape[0]
            if not fits:
                raise bad(f"has {a} {tuple(ta.shape)} and {b} {tuple(tb.shape)}, which do not fit together")
            if tb.shape[0] == 0:
                raise bad(f"has rank 0 ({b} has shape {tuple(tb.shape)}), so it would change nothing")


def _group_kohya(p: Path, tensors: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor]]:
    names, bad, embeddings = {}, [], {}
    for key in tensors:
        if key.startswith("bundle_emb."):  # kohya's bundled pivotal-tuning embeddings
            embeddings[key[len("bundle_emb."):]] = tensors[key]
        elif key.startswith(KOHYA_PREFIXES) and "." in key:
            names[key] = tuple(key.split(".", 1))
        else:
            bad.append(key)
    if bad:
        raise _fail(p, "keys outside the kohya scheme (lora_unet_/lora_te_/lora_te1_/lora_te2_)", bad)
    return _split_modules(p, tensors, names), embeddings


def _peft_alpha(p: Path, metadata: Mapping[str, str], component: str, module: str) -> float | None:
    """lora_alpha from diffusers' ``lora_adapter_metadata`` (peft LoraConfig fields prefixed by component). An
    alpha field that is not one finite number, or an ``alpha_pattern`` that is not a mapping of valid regular
    expressions, is refused with the field named (a header that is not a JSON object is ignored)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(cfg, dict):
        return None

    def bad(field: str, value: object, what: str) -> LoraFormatError:
        return LoraFormatError(f"{p}: lora_adapter_metadata field {field} is {json.dumps(value)[:80]}, but it must "
                               f"be {what}. The file is damaged: download or export it again.")

    def number(field: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(field, value, "one finite number")
        return float(value)

    patterns = cfg.get(f"{component}.alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise bad(f"{component}.alpha_pattern", patterns, "a mapping of module patterns to alphas")
    for pattern, value in patterns.items():
        try:
            hit = module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module)
        except re.error as err:
            raise bad(f"{component}.alpha_pattern", pattern, f"a regular expression ({err})") from err
        if hit:
            return number(f"{component}.alpha_pattern[{json.dumps(pattern)}]", value)
    alpha = cfg.get(f"{component}.lora_alpha")
    return number(f"{component}.lora_alpha", alpha) if alpha is not None else None


def _group_peft(p: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, LoraModule]:
    split = {k: split_peft_key(k) for k in tensors}
    bad = [k for k, v in split.items() if v is None]
    if bad:
        raise _fail(p, "keys outside the diffusers/peft scheme (unet./text_encoder. + lora_A/lora_B)", bad)
    sdxl = any(v[0] == "text_encoder_2" for v in split.values())
    names = {k: (kohya_module_name(kohya_prefix_for(c, sdxl), m), s) for k, (c, m, s) in split.items()}
    modules = _split_modules(p, tensors, names)
    for key, (comp, module, _) in split.items():
        mod = modules[names[key][0]]
        mod.extra["peft_name"] = f"{comp}.{module}"
        if "dora_scale" in mod.tensors:  # peft keeps one magnitude per output ((out,) or conv (1, out, 1, 1))
            _dora_per_output(mod)
        if mod.alpha is None:
            alpha = _peft_alpha(p, metadata, comp, module)
            if alpha is not None:
                mod.alpha = alpha
    return modules


def _group_cloneofsimo(p: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                       ) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor]]:
    """cloneofsimo/lora files: ``unet:N:up/down`` and ``text_encoder:N:up/down`` by position, the target
    classes in the metadata, token vectors under their token (``<s1>``). See ``keys.cloneofsimo_unet_names``."""
    def refuse(why: str) -> LoraFormatError:
        return LoraFormatError(f"{p} is in the cloneofsimo/lora format (modules stored by position, "
                               f"'unet:0:up'...), and its modules cannot be placed reliably: {why}. Convert it to "
                               "a kohya/Civitai or diffusers LoRA with cloneofsimo's tools.")
    pos: dict[str, dict[int, dict[str, torch.Tensor]]] = {"unet": {}, "text_encoder": {}}
    embeddings, bad = {}, []
    for key, t in tensors.items():
        m = re.fullmatch(r"(unet|text_encoder):(\d+):(up|down)", key)
        if m:
            pos[m.group(1)].setdefault(int(m.group(2)), {})[m.group(3)] = t
        elif metadata.get(key) == "<embed>":
            embeddings[key] = t
        else:
            bad.append(key)
    if bad:
        raise _fail(p, "keys outside the cloneofsimo scheme", bad)
    try:
        targets = {c: set(json.loads(metadata.get(c, "[]"))) for c in pos}
    except json.JSONDecodeError as err:
        raise refuse(f"its target list is not JSON ({err})") from err
    for comp, entries in pos.items():
        if sorted(entries) != list(range(len(entries))) or any(len(e) != 2 for e in entries.values()):
            raise refuse(f"the {comp} positions are not complete up/down pairs 0..{len(entries) - 1}")
    if targets["unet"] - {"CrossAttention", "Attention", "GEGLU"} or targets["text_encoder"] - {"CLIPAttention"}:
        raise refuse(f"it targets {sorted(targets['unet'] | targets['text_encoder'])}, beyond attention and GEGLU")
    modules: dict[str, LoraModule] = {}
    if pos["unet"]:
        ups = [tuple(pos["unet"][i]["up"].shape) for i in range(len(pos["unet"]))]
        downs = [tuple(pos["unet"][i]["down"].shape) for i in range(len(pos["unet"]))]
        names, why = cloneofsimo_unet_names(ups, downs, bool(targets["unet"] & {"CrossAttention", "Attention"}),
                                            "GEGLU" in targets["unet"])
        if names is None:
            raise refuse(why)
        for i, n in enumerate(names):
            modules[kohya_module_name("lora_unet_", n)] = (pos["unet"][i]["down"], pos["unet"][i]["up"])
    if pos["text_encoder"]:
        if len(pos["text_encoder"]) % 4 or any(pos["text_encoder"][i]["up"].shape[0] != pos["text_encoder"][0]["up"]
                                                .shape[0] for i in pos["text_encoder"]):
            raise refuse("its text-encoder modules are not whole CLIP attention layers")
        for i, n in enumerate(cloneofsimo_text_names(len(pos["text_encoder"]))):
            modules[kohya_module_name("lora_te_", n)] = (pos["text_encoder"][i]["down"], pos["text_encoder"][i]["up"])
    return {n: _build_module(p, n, {"lora_down.weight": d, "lora_up.weight": u}) for n, (d, u) in modules.items()}, \
        embeddings


def _family(lf: LoraFile) -> Family | None:
    """Family from shapes (text-encoder width, cross-attention width, a second text encoder); metadata only
    when shapes cannot tell (toy models). Shapes win over metadata; a disagreement is noted."""
    evidence: set[Family] = set()
    for name, mod in lf.modules.items():
        comp = component_of_kohya_name(name)
        if comp == "text_encoder_2":
            evidence.add(Family.SDXL)
            continue
        try:
            width = int(natural_shape(mod)[1])
        except (KeyError, IndexError):
            continue
        if comp == "unet" and name.endswith(("attn2_to_k", "attn2_to_v")):
            fam = family_from_context_dim(width)
        elif comp == "text_encoder" and name.endswith(("q_proj", "k_proj", "v_proj")):
            fam = {768: Family.SD1, 1024: Family.SD2, 1280: Family.SDXL}.get(width)
        else:
            fam = None
        if fam is not None:
            evidence.add(fam)
    shape_family = next((f for f in (Family.SDXL, Family.SD2, Family.SD1) if f in evidence), None)
    claimed = family_from_metadata(lf.metadata)
    if shape_family is not None:
        if claimed is not None and claimed != shape_family:
            lf.notes.append(f"metadata claims {claimed.label}, but the shapes say {shape_family.label}; "
                            f"using {shape_family.label}")
        return shape_family
    if claimed is not None:
        lf.notes.append(f"family {claimed.label} taken from the metadata (the shapes do not tell)")
    return claimed

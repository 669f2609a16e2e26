"""Key maps between kohya LoRA names, diffusers module names and original (ldm) checkpoint names.

Pure functions over strings; a name that cannot be mapped is reported by the caller, never dropped.

Naming schemes met in real files:

* kohya SD1/SD2: ``lora_unet_`` + the *diffusers* module name with ``.`` -> ``_``
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``), text encoder ``lora_te_`` +
  ``text_model_encoder_layers_0_self_attn_q_proj`` (transformers 4 spelling) or ``encoder_layers_...``
  (what module names give under transformers 5, which dropped the ``text_model`` level).
* kohya SDXL: ``lora_te1_``/``lora_te2_`` for the two text encoders, and the UNet in *original (ldm)* naming:
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``lora_unet_middle_block_1_...``,
  ``lora_unet_output_blocks_0_0_in_layers_2``.
* diffusers/peft: ``unet.<module>.lora_A.weight`` / ``text_encoder.<module>.lora_B.weight`` (older diffusers:
  ``.lora.down.weight``, ``.processor.to_q_lora.down.weight``, ``.lora_linear_layer.down.weight``).

Because ``_`` joins are not reversible, names are matched *forwards*: every Linear/Conv2d of the loaded pipeline
gets all the kohya spellings it may appear under, and a file's names are looked up in that index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..errors import FamilyMismatchError, LoraFormatError
from ..family import family_of_pipeline
from .math import delta_shape, natural_shape
import torch

# kohya prefixes per component. SD1/SD2 have one text encoder ("lora_te_"); SDXL has two ("lora_te1_", "lora_te2_").
UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
TE1_PREFIX = "lora_te1_"
TE2_PREFIX = "lora_te2_"
KOHYA_PREFIXES = (UNET_PREFIX, TE1_PREFIX, TE2_PREFIX, TE_PREFIX)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def kohya_module_name(prefix: str, module_name: str, layout: "UnetLayout | None" = None) -> str:
    """``("lora_unet_", "down_blocks.0.attentions.0.proj_in")`` -> ``"lora_unet_down_blocks_0_attentions_0_proj_in"``.

    With a UNet ``layout`` (SDXL), UNet names are written in the original (ldm) layout, as kohya's sd-scripts
    writes SDXL files: ``lora_unet_input_blocks_1_1_proj_in``, ``lora_unet_label_emb_0_0``; diffusers'
    ``load_lora_weights`` reads SDXL files only in that spelling (it merges ``add_embedding_linear_1`` and
    ``_2`` into one name). A module outside that layout raises ``LoraFormatError``.
    Text-encoder module names are written in the spelling real kohya files use
    (``text_model.encoder.layers...``), adding the ``text_model.`` level that
    transformers 5.x ``CLIPTextModel`` no longer has.
    """
    if prefix == UNET_PREFIX and layout is not None:
        ldm = diffusers_unet_to_ldm(module_name, layout)
        if ldm is None:
            raise LoraFormatError(f"UNet module {module_name} has no name in the original (ldm) SDXL layout that "
                                  "kohya's SDXL LoRA files use; leave it out of the target modules.")
        module_name = ldm
    if prefix != UNET_PREFIX and module_name.startswith("encoder.layers."):
        module_name = "text_model." + module_name
    return prefix + module_name.replace(".", "_")


def canonical_kohya_name(name: str) -> str:
    """One spelling per text-encoder module name in a file, the one ``kohya_module_name`` writes (transformers
    5.x names lack the ``text_model.`` level that real kohya files have), so two files merge module by module."""
    for prefix in (TE_PREFIX, TE1_PREFIX, TE2_PREFIX):
        if name.startswith(prefix + "encoder_layers_"):
            return prefix + "text_model_" + name[len(prefix):]
    return name


# --------------------------------------------------------------------------- diffusers <-> ldm UNet names
_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_TO_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


@dataclass(frozen=True)
class UnetLayout:
    """What the diffusers -> ldm renumbering needs to know about a UNet (read from its config)."""

    layers_per_block: int
    up_has_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config) -> "UnetLayout":
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        lpb = get("layers_per_block", 2)
        if not isinstance(lpb, int):  # a per-block tuple: kohya's SDXL naming assumes one value
            lpb = int(lpb[0])
        ups = tuple("CrossAttn" in t for t in get("up_block_types", ()))
        return cls(int(lpb), ups)


def diffusers_unet_to_ldm(name: str, layout: UnetLayout) -> str | None:
    """``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (SD layout with 2 layers per block).

    Returns None for names outside the renumbered parts. The numbering is the one of the original
    Stable Diffusion code (and of diffusers' own conversion scripts).
    """
    if name in _TOP_TO_LDM:
        return _TOP_TO_LDM[name]
    n = layout.layers_per_block
    parts = name.split(".")

    def block(resnet: str, attention: str, kind: str, rest: list[str]) -> str | None:
        """A resnet or attention of one ldm block, given the two ldm heads the block's parts go under."""
        if kind == "resnets":
            if not rest or rest[0] not in _RESNET_TO_LDM:
                return None
            return ".".join([resnet, _RESNET_TO_LDM[rest[0]], *rest[1:]])
        if kind == "attentions":
            return ".".join([attention, *rest])
        return None

    if parts[0] == "down_blocks" and len(parts) >= 4:
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers" and rest == ["conv"]:
            return f"input_blocks.{(i + 1) * (n + 1)}.0.op"
        idx = i * (n + 1) + j + 1
        return block(f"input_blocks.{idx}.0", f"input_blocks.{idx}.1", kind, rest)
    if parts[0] == "mid_block" and len(parts) >= 3:
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        return block(f"middle_block.{2 * j}", f"middle_block.{2 * j + 1}", kind, rest)
    if parts[0] == "up_blocks" and len(parts) >= 4:
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers" and rest == ["conv"]:
            has_attn = i < len(layout.up_has_attention) and layout.up_has_attention[i]
            return f"output_blocks.{i * (n + 1) + n}.{2 if has_attn else 1}.conv"
        idx = i * (n + 1) + j
        return block(f"output_blocks.{idx}.0", f"output_blocks.{idx}.1", kind, rest)
    return None


# --------------------------------------------------------------------------- peft / diffusers names -> kohya names
# Suffixes of the diffusers/peft layouts, mapped to the kohya suffix they mean.
PEFT_SUFFIXES = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale",
    "alpha": "alpha",
}
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
PEFT_COMPONENT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}


def split_peft_key(key: str) -> tuple[str, str, str] | None:
    """``unet.down_blocks.0...attn1.to_q.lora_A.weight`` -> ``("unet", "down_blocks.0...attn1.to_q", "lora_down.weight")``.

    Returns None when the key is not in a diffusers/peft layout. Component-less peft keys
    (``base_model.model.<module>``) are assigned by their module names.
    """
    m = _OLD_PROCESSOR.search(key)
    if m:  # diffusers <= 0.14 attention-processor LoRA
        head = key[: m.start()]
        proj = "to_out.0" if m.group(1) == "to_out" else m.group(1)
        key = f"{head}.{proj}.lora.{m.group(2)}.weight"
    for suffix, kohya_suffix in PEFT_SUFFIXES.items():
        if key.endswith("." + suffix):
            stem = key[: -len(suffix) - 1]
            break
    else:
        return None
    if stem.startswith("base_model.model."):
        stem = stem[len("base_model.model."):]
        comp = "text_encoder" if ("encoder.layers." in stem or stem.startswith("text_model.")) else "unet"
        return comp, stem, kohya_suffix
    for prefix, comp in sorted(PEFT_COMPONENT_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if stem.startswith(prefix):
            return comp, stem[len(prefix):], kohya_suffix
    return None


def kohya_prefix_for(component: str, sdxl: bool) -> str:
    if component == "unet":
        return UNET_PREFIX
    if component == "text_encoder_2":
        return TE2_PREFIX
    return TE1_PREFIX if sdxl else TE_PREFIX


def component_of_kohya_name(name: str) -> str | None:
    """``lora_te2_...`` -> ``"text_encoder_2"``; None for a name without a kohya prefix."""
    if name.startswith(UNET_PREFIX):
        return "unet"
    if name.startswith(TE2_PREFIX):
        return "text_encoder_2"
    if name.startswith(TE1_PREFIX) or name.startswith(TE_PREFIX):
        return "text_encoder"
    return None


# --------------------------------------------------------------------------- blocks (for per-block weights)
def unet_block_of(module_name: str) -> tuple[str, int | None]:
    """The UNet block a diffusers module name belongs to: ``("down", 1)``, ``("mid", None)``, ``("up", 0)``,
    or ``("other", None)`` for conv_in, time embedding and conv_out."""
    parts = module_name.split(".")
    if parts[0] == "down_blocks":
        return "down", int(parts[1])
    if parts[0] == "up_blocks":
        return "up", int(parts[1])
    if parts[0] == "mid_block":
        return "mid", None
    return "other", None


# --------------------------------------------------------------------------- the forward index of a pipeline
def module_index(components: Mapping[str, object]) -> dict[str, tuple[str, str]]:
    """Every kohya spelling of every Linear/Conv2d in the given components -> ``(component, module_name)``.

    ``components`` maps "unet"/"text_encoder"/"text_encoder_2" to torch modules (a missing one is skipped).
    """

    sdxl = components.get("text_encoder_2") is not None
    index: dict[str, tuple[str, str]] = {}
    for comp, model in components.items():
        if model is None or comp not in COMPONENTS:
            continue
        layout = UnetLayout.from_config(model.config) if comp == "unet" else None
        for name, mod in model.named_modules():
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            for kname in kohya_spellings(comp, name, sdxl, layout):
                index.setdefault(kname, (comp, name))
    return index


def kohya_spellings(component: str, module_name: str, sdxl: bool, layout: UnetLayout | None = None) -> list[str]:
    """All kohya names a module may appear under in real files (see the module docstring)."""
    if component == "unet":
        names = [UNET_PREFIX + module_name.replace(".", "_")]
        ldm = diffusers_unet_to_ldm(module_name, layout) if layout is not None else None
        if ldm is not None:
            names.append(UNET_PREFIX + ldm.replace(".", "_"))
        return names
    bare = module_name[len("text_model."):] if module_name.startswith("text_model.") else module_name
    prefixes = [kohya_prefix_for(component, sdxl)]
    if component == "text_encoder":  # diffusers' converter writes SD1 text encoders as lora_te1_ too
        prefixes.append(TE1_PREFIX if not sdxl else TE_PREFIX)
    out = []
    for p in prefixes:
        out += [p + "text_model_" + bare.replace(".", "_"), p + bare.replace(".", "_")]
    return out


@dataclass
class MatchResult:
    """Which of a LoRA file's modules land on which pipeline module, and which do not."""

    matched: dict[str, tuple[str, str]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    @property
    def counts(self) -> tuple[int, int]:
        return len(self.matched), len(self.unmatched)


def match_names(names: Iterable[str], index: Mapping[str, tuple[str, str]]) -> MatchResult:
    result = MatchResult()
    for n in names:
        if n in index:
            result.matched[n] = index[n]
        else:
            result.unmatched.append(n)
    return result


def pipeline_components(pipe) -> dict[str, object]:
    """The LoRA-bearing components of a pipeline (or a plain dict of them)."""
    if isinstance(pipe, Mapping):
        return {k: v for k, v in pipe.items() if k in COMPONENTS and v is not None}
    return {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}


def match_modules(lora_file, pipe, check_shapes: bool = True) -> MatchResult:
    """Map a ``LoraFile``'s modules onto the pipeline's modules and check each delta's shape fits.

    A shape that does not fit raises ``FamilyMismatchError`` when the file is for another family, else
    ``LoraFormatError`` naming the modules (the LoRA was made for a model of another size).
    """
    comps = pipeline_components(pipe)
    result = match_names(lora_file.modules, module_index(comps))
    if not check_shapes:
        return result
    bad = []
    for kname, (comp, mname) in result.matched.items():
        weight = comps[comp].get_submodule(mname).weight
        want = tuple(weight.shape)
        got = delta_shape(lora_file.modules[kname], want)
        if got is None:
            bad.append(f"{kname}: delta {natural_shape(lora_file.modules[kname])} vs weight {want}")
    if bad:
        base = family_of_pipeline(pipe) if not isinstance(pipe, Mapping) else None
        fam = lora_file.family
        head = f"{lora_file.path}: {len(bad)} module(s) do not fit the loaded model's weights"
        if fam is not None and base is not None and fam != base:
            raise FamilyMismatchError(f"{head}: the LoRA is made for {fam.label}, but the loaded base model is "
                                      f"{base.label}. Load a {fam.label} base model, or pick a LoRA made for "
                                      f"{base.label}. First: {'; '.join(bad[:3])}")
        raise LoraFormatError(f"{head} (it was made for a model of another size): {'; '.join(bad[:5])}"
                              f"{' ...' if len(bad) > 5 else ''}. Use a LoRA trained on this base model.")
    return result


# --------------------------------------------------------------------------- cloneofsimo/lora (positional) layout
# cloneofsimo/lora saves modules by position ("unet:17:up"), in the order torch's ``modules()`` met them in the
# diffusers SD1/SD2 UNet and transformers' CLIP text encoder. These tables give that order; the reader checks
# every position against the shapes it implies (block widths, cross-attention width, the 8x-wide GEGLU).
SD_UNET_TRANSFORMERS = ([(f"down_blocks.{i}.attentions.{j}", i) for i in range(3) for j in range(2)]
                        + [(f"up_blocks.{i}.attentions.{j}", 3 - i) for i in (1, 2, 3) for j in range(3)]
                        + [("mid_block.attentions.0", 3)])  # (path, width level) in registration order
SD_WIDTHS = (320, 640, 1280, 1280)
ATTN_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_ATTENTION_LINEARS = ("k_proj", "v_proj", "q_proj", "out_proj")  # CLIPAttention's registration order


def cloneofsimo_unet_names(ups: list[tuple[int, ...]], downs: list[tuple[int, ...]], attention: bool, geglu: bool
                           ) -> tuple[list[str] | None, str]:
    """Module names for the positional UNet entries of a cloneofsimo file, or (None, why) when the shapes do
    not fit the SD1/SD2 UNet. ``ups``/``downs`` are the up/down weight shapes by position."""
    per = (8 if attention else 0) + (1 if geglu else 0)
    if per == 0 or len(ups) != per * len(SD_UNET_TRANSFORMERS):
        return None, (f"{len(ups)} UNet modules, but the SD 1.x/2.x UNet has {per * len(SD_UNET_TRANSFORMERS)} "
                      "for these target classes")
    names: list[str] = []
    context = None
    for b, (path, level) in enumerate(SD_UNET_TRANSFORMERS):
        width = SD_WIDTHS[level]
        pos = list(range(b * per, (b + 1) * per))
        block = []
        ff = [p for p in pos if ups[p][0] == 8 * width and downs[p][1] == width]
        if geglu and len(ff) != 1:
            return None, f"no single 8x-wide GEGLU projection among positions {pos[0]}..{pos[-1]}"
        attn_pos = [p for p in pos if p not in ff]
        if attention:
            for k, p in enumerate(attn_pos):
                cross = k in (5, 6)  # attn2.to_k / attn2.to_v read the text-encoder context
                if ups[p][0] != width or (not cross and downs[p][1] != width):
                    return None, f"position {p} has shape {ups[p][0]}x{downs[p][1]}, expected width {width}"
                if cross:
                    context = context or downs[p][1]
                    if downs[p][1] != context:
                        return None, f"position {p} reads a context of {downs[p][1]}, others {context}"
                block.append(f"{path}.transformer_blocks.0.attn{1 + k // 4}.{ATTN_LINEARS[k % 4]}")
        by_pos = dict(zip(attn_pos, block)) | {p: f"{path}.transformer_blocks.0.ff.net.0.proj" for p in ff}
        names += [by_pos[p] for p in pos]
    return names, ""


def cloneofsimo_text_names(count: int) -> list[str]:
    """Module names (transformers-4 spelling) for ``count`` positional CLIPAttention linears."""
    return [f"text_model.encoder.layers.{i // 4}.self_attn.{CLIP_ATTENTION_LINEARS[i % 4]}" for i in range(count)]

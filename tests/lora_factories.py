"""Small LoRA files for the demo model in every exact layout real tools write. Other tests import these.

Each ``write_*`` function takes the output path and a demo pipeline (for module names and shapes), writes a
.safetensors file atomically with ``save_safetensors_atomic`` and returns the path. Tensors are seeded, so
the same call writes the same file. Key layouts:

* kohya LoRA/LoCon: ``<kohya name>.lora_down.weight``, ``.lora_up.weight``, optional ``.alpha``
* LoHa: ``.hada_w1_a .hada_w1_b .hada_w2_a .hada_w2_b`` + ``.alpha``
* LoKr: ``.lokr_w1 .lokr_w2`` (whole), or ``.lokr_w1_a .lokr_w1_b .lokr_w2_a .lokr_w2_b`` (factored, as in
  the real smart_falcon files), or ``.lokr_w1`` + ``.lokr_w2_a .lokr_w2_b`` (LyCORIS' usual form), + ``.alpha``
* DoRA: a kohya LoRA plus ``.dora_scale`` of shape (1, in) (kohya/A1111) or (out, 1) (LyCORIS wd_on_out)
* peft/diffusers: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``, ``text_encoder.<module>...``; older
  diffusers ``.lora.down.weight`` / ``.lora.up.weight``; ``lora_adapter_metadata`` holds lora_alpha
* SDXL: ``lora_te1_``/``lora_te2_`` text-encoder keys and ldm-named UNet keys (``input_blocks_4_1_...``)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_studio.fileio import save_safetensors_atomic
from lora_studio.lora.keys import kohya_module_name

ATTN_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in", "proj_out")
TE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
CONV_SUFFIXES = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


def targets(pipe, conv: bool = False, te: bool = True) -> list[tuple[str, str, tuple[int, ...]]]:
    """(component, module name, weight shape) of the layers a kohya LoRA trains on the demo model."""
    out = []
    for name, mod in pipe.unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(ATTN_SUFFIXES):
            out.append(("unet", name, tuple(mod.weight.shape)))
        elif conv and isinstance(mod, torch.nn.Conv2d) and name.endswith(CONV_SUFFIXES):
            out.append(("unet", name, tuple(mod.weight.shape)))
        elif conv and isinstance(mod, torch.nn.Linear) and name.endswith("time_emb_proj"):
            out.append(("unet", name, tuple(mod.weight.shape)))
    if te:
        for name, mod in pipe.text_encoder.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith(TE_SUFFIXES):
                out.append(("text_encoder", name, tuple(mod.weight.shape)))
    return out


def kohya_name(component: str, module: str, te_spelling: str = "text_model") -> str:
    if component == "unet":
        return kohya_module_name("lora_unet_", module)
    if te_spelling == "text_model":
        return kohya_module_name("lora_te_", module)
    return "lora_te_" + module.replace(".", "_")  # the transformers-5 spelling (no text_model level)


def split2(n: int) -> tuple[int, int]:
    """n = a * b with a the largest divisor <= sqrt(n) (how LyCORIS factors a dimension)."""
    a = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return a, n // a


def _rand(g: torch.Generator, *shape: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _lora_tensors(g, shape, rank, dora: str | None = None) -> dict[str, torch.Tensor]:
    out_dim, in_dim = shape[0], shape[1]
    if len(shape) == 4:
        t = {"lora_down.weight": _rand(g, rank, in_dim, *shape[2:]), "lora_up.weight": _rand(g, out_dim, rank, 1, 1)}
    else:
        t = {"lora_down.weight": _rand(g, rank, in_dim), "lora_up.weight": _rand(g, out_dim, rank)}
    if dora == "in":  # kohya / A1111: one magnitude per input column
        t["dora_scale"] = 1 + _rand(g, 1, in_dim, *([1] * (len(shape) - 2)))
    elif dora == "out":  # LyCORIS wd_on_out: one magnitude per output row
        t["dora_scale"] = 1 + _rand(g, out_dim, *([1] * (len(shape) - 1)))
    return t


def _loha_tensors(g, shape, rank) -> dict[str, torch.Tensor]:
    out_dim, flat_in = shape[0], int(torch.tensor(shape[1:]).prod())
    return {"hada_w1_a": _rand(g, out_dim, rank, scale=0.3), "hada_w1_b": _rand(g, rank, flat_in, scale=0.3),
            "hada_w2_a": _rand(g, out_dim, rank, scale=0.3), "hada_w2_b": _rand(g, rank, flat_in, scale=0.3)}


def _lokr_tensors(g, shape, rank, variant: str) -> dict[str, torch.Tensor]:
    o1, o2 = split2(shape[0])
    i1, i2 = split2(shape[1])
    k = tuple(shape[2:])
    if variant == "full":  # lokr_w1 (o1, i1), lokr_w2 (o2, i2[, kh, kw])
        return {"lokr_w1": _rand(g, o1, i1, scale=0.3), "lokr_w2": _rand(g, o2, i2, *k, scale=0.3)}
    if variant == "w2_factored":  # LyCORIS' usual form; conv w2 factored over in*kh*kw
        return {"lokr_w1": _rand(g, o1, i1, scale=0.3), "lokr_w2_a": _rand(g, o2, rank, scale=0.3),
                "lokr_w2_b": _rand(g, rank, i2 * int(torch.tensor(k).prod()) if k else i2, scale=0.3)}
    if variant == "factored":  # the real smart_falcon files: both factored, kernel folded into the inputs
        kk = int(torch.tensor(k).prod()) if k else 1
        return {"lokr_w1_a": _rand(g, o1, rank, scale=0.3), "lokr_w1_b": _rand(g, rank, i1, scale=0.3),
                "lokr_w2_a": _rand(g, o2, rank, scale=0.3), "lokr_w2_b": _rand(g, rank, i2 * kk, scale=0.3)}
    raise ValueError(variant)


def _write(path, tensors, metadata=None, dtype=torch.float32) -> Path:
    save_safetensors_atomic({k: v.to(dtype) for k, v in tensors.items()}, path, metadata or {})
    return Path(path)


def write_kind(path, pipe, kind: str = "lora", rank: int = 4, alpha: float | None = 2.0, conv: bool = False,
               te: bool = True, seed: int = 0, te_spelling: str = "text_model", lokr_variant: str = "factored",
               dora: str | None = None, metadata: dict | None = None, dtype=torch.float32) -> Path:
    """A kohya-layout file of one kind ("lora", "loha", "lokr", "full") over the demo model's layers."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for comp, module, shape in targets(pipe, conv=conv, te=te):
        name = kohya_name(comp, module, te_spelling)
        if kind == "lora":
            part = _lora_tensors(g, shape, rank, dora)
        elif kind == "loha":
            part = _loha_tensors(g, shape, rank)
        elif kind == "lokr":
            part = _lokr_tensors(g, shape, rank, lokr_variant)
        elif kind == "full":
            part = {"diff": _rand(g, *shape, scale=0.01)}
        else:
            raise ValueError(kind)
        for suffix, t in part.items():
            tensors[f"{name}.{suffix}"] = t
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1"}
    meta.update(metadata or {})
    return _write(path, tensors, meta, dtype)


def write_kohya_lora(path, pipe, rank=4, alpha: float | None = 2.0, conv=False, te=True, seed=0, **kw) -> Path:
    """kohya/Civitai LoRA (linear only) or LoCon (``conv=True``), with or without ``.alpha``."""
    return write_kind(path, pipe, "lora", rank, alpha, conv, te, seed, **kw)


def write_loha(path, pipe, rank=4, alpha=2.0, conv=False, seed=0, **kw) -> Path:
    return write_kind(path, pipe, "loha", rank, alpha, conv, True, seed, **kw)


def write_lokr(path, pipe, variant="factored", rank=2, alpha=1.0, conv=False, seed=0, **kw) -> Path:
    """LoKr: ``variant`` "full" (lokr_w1, lokr_w2), "factored" (w1_a/_b, w2_a/_b), "w2_factored" (w1, w2_a/_b)."""
    return write_kind(path, pipe, "lokr", rank, alpha, conv, True, seed, lokr_variant=variant, **kw)


def write_dora(path, pipe, rank=4, alpha=2.0, direction="in", conv=False, seed=0, **kw) -> Path:
    return write_kind(path, pipe, "lora", rank, alpha, conv, True, seed, dora=direction, **kw)


def write_peft_lora(path, pipe, rank=4, alpha: float | None = 8.0, seed=0, old_names=False, te=True) -> Path:
    """diffusers/peft layout: ``unet.<module>.lora_A.weight`` (or older ``.lora.down.weight``); lora_alpha is
    stored in diffusers' ``lora_adapter_metadata`` header entry (keys ``unet.lora_alpha``, ``unet.r``)."""
    g = torch.Generator().manual_seed(seed)
    a_suf, b_suf = ("lora.down.weight", "lora.up.weight") if old_names else ("lora_A.weight", "lora_B.weight")
    tensors = {}
    found = targets(pipe, te=te)
    if te and getattr(pipe, "text_encoder_2", None) is not None:
        found += [("text_encoder_2", n, tuple(m.weight.shape)) for n, m in pipe.text_encoder_2.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.endswith(TE_SUFFIXES)]
    for comp, module, shape in found:
        t = _lora_tensors(g, shape, rank)
        tensors[f"{comp}.{module}.{a_suf}"] = t["lora_down.weight"]
        tensors[f"{comp}.{module}.{b_suf}"] = t["lora_up.weight"]
    meta = {}
    if alpha is not None:
        cfg = {}
        for comp in {c for c, _, _ in found}:
            cfg.update({f"{comp}.r": rank, f"{comp}.lora_alpha": alpha,
                        f"{comp}.target_modules": sorted(m for c, m, _ in found if c == comp)})
        meta["lora_adapter_metadata"] = json.dumps(cfg)
    return _write(path, tensors, meta)


def write_sdxl_lora(path, rank=4, seed=0, width=32, te2_width=48, context=80) -> Path:
    """A small file in the kohya SDXL layout: ``lora_te1_``/``lora_te2_`` and ldm-named UNet modules."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    shapes = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (width, width),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (te2_width, te2_width),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (64, 64),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (64, context),
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k": (64, context),
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q": (64, 64),
    }
    for name, shape in shapes.items():
        for suffix, t in _lora_tensors(g, shape, rank).items():
            tensors[f"{name}.{suffix}"] = t
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    return _write(path, tensors, meta)


def demo_or_random_pipeline():
    """The shipped demo model when its weights are present, else the same architecture with random weights
    (never trains: tests must not spend minutes building the demo model)."""
    from lora_studio.demo import DEMO_MODEL_DIR, load_demo_pipeline, random_demo_pipeline

    if (DEMO_MODEL_DIR / "model_index.json").exists():
        return load_demo_pipeline()
    return random_demo_pipeline()


def write_kohya_sdxl_lora(path, pipe, rank=4, alpha=2.0, conv=False, seed=0) -> Path:
    """A kohya SDXL LoRA for an SDXL-structured pipeline: UNet modules under their original (ldm) names
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), text encoders as ``lora_te1_``/``lora_te2_``."""
    from lora_studio.lora.keys import UnetLayout, diffusers_unet_to_ldm

    g = torch.Generator().manual_seed(seed)
    layout = UnetLayout.from_config(pipe.unet.config)
    tensors = {}
    for comp, module, shape in targets(pipe, conv=conv, te=False):
        ldm = diffusers_unet_to_ldm(module, layout)
        assert ldm is not None, module
        for suffix, t in _lora_tensors(g, shape, rank).items():
            tensors[f"lora_unet_{ldm.replace('.', '_')}.{suffix}"] = t
        tensors[f"lora_unet_{ldm.replace('.', '_')}.alpha"] = torch.tensor(float(alpha))
    for comp, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for module, mod in getattr(pipe, comp).named_modules():
            if isinstance(mod, torch.nn.Linear) and module.endswith(TE_SUFFIXES):
                name = prefix + "text_model_" + module.removeprefix("text_model.").replace(".", "_")
                for suffix, t in _lora_tensors(g, tuple(mod.weight.shape), rank).items():
                    tensors[f"{name}.{suffix}"] = t
                tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return _write(path, tensors, {"ss_base_model_version": "sdxl_base_v1-0"})

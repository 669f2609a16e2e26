"""The diffusers configs of an original-layout (ldm) single file, derived from its tensor shapes (header only).

For a file that carries no ``lora_studio.configs`` (one written by another tool) and has non-standard sizes.
Starts from the family's shipped configs (``sd15/``, ``sd21/``, ``sdxl/``) and overrides every value the names and
shapes tell: UNet widths per level, resnets per level, which levels attend, transformer depth per level,
cross-attention width, linear or conv projections, time and SDXL size embeddings; VAE widths, depth, latent
channels; text encoder width, depth, MLP width, vocabulary and positions. What shapes cannot tell (attention
heads, GroupNorm groups, activation, ``upcast_attention``, the scheduler, the VAE scaling factor) follows the
family's convention; each such rule is commented where it is applied.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from ..family import Family
from ..ldm.text import SD1_CLIP_PREFIX, SD2_OPENCLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX
from ..ldm.unet import PREFIX as UNET
from . import config_dir

VAE = "first_stage_model."
SD2_FULL_TEXT_LAYERS = 24  # a full OpenCLIP-H tower; diffusers keeps 23 (ldm/__init__.py pads 23 -> 24 on export)


class ShapesUnclear(ValueError):
    """The file's names and shapes do not describe a model this module can configure (the message says why)."""


def _shapes(header: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape, from safetensors header entries (or tensors)."""
    return {k: tuple(int(d) for d in (v["shape"] if isinstance(v, Mapping) else v.shape)) for k, v in header.items()
            if not k.startswith("__") and (isinstance(v, Mapping) and "shape" in v or hasattr(v, "shape"))}


def _get(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ShapesUnclear(f"it has no {key}")
    return shapes[key]


def _indices(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> list[int]:
    """The numbers N of ``prefix + "N."`` present, sorted."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m[1]) for k in shapes if (m := pattern.match(k))})


def _has(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _groups(channels: list[int], family_groups: int) -> int:
    # GroupNorm's group count is not in any shape: the family's (32) when it divides every width, else the
    # largest count below it that does (so a narrow model still builds)
    common = math.gcd(*channels)
    return max(g for g in range(1, family_groups + 1) if common % g == 0)


def _unet_levels(shapes) -> tuple[list[list[int]], int]:
    """``input_blocks`` indices of the resnets of each level (downsamplers, ``.0.op``, end a level)."""
    levels: list[list[int]] = [[]]
    blocks = [i for i in _indices(shapes, UNET + "input_blocks.") if i > 0]
    if blocks != list(range(1, len(blocks) + 1)):
        raise ShapesUnclear(f"its UNet input_blocks are not numbered 1..{len(blocks)} ({blocks})")
    for i in blocks:
        if UNET + f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(i)
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise ShapesUnclear(f"its UNet levels hold {[len(level) for level in levels]} resnets (the original layout "
                            "has the same number in every level)")
    return levels, counts.pop()


def _transformer_depth(shapes, block: str) -> int:
    return len(_indices(shapes, block + "transformer_blocks."))


def derive_unet(shapes, family: Family, base: dict, pooled_dim: int | None) -> dict:
    levels, lpb = _unet_levels(shapes)
    widths = [_get(shapes, UNET + f"input_blocks.{level[0]}.0.in_layers.2.weight")[0] for level in levels]
    attends = [_has(shapes, UNET + f"input_blocks.{level[0]}.1.") for level in levels]
    depths = [_transformer_depth(shapes, UNET + f"input_blocks.{level[0]}.1.") if a else 1
              for level, a in zip(levels, attends)]
    n = len(levels)
    up_attends = [_has(shapes, UNET + f"output_blocks.{u * (lpb + 1)}.1.transformer_blocks.") for u in range(n)]
    if up_attends != attends[::-1] or not _has(shapes, UNET + f"output_blocks.{n * (lpb + 1) - 1}.0."):
        raise ShapesUnclear("its UNet output_blocks do not mirror its input_blocks")
    if not _has(shapes, UNET + "middle_block.1.transformer_blocks."):
        raise ShapesUnclear("its UNet has no middle-block transformer")
    to_k = sorted(k for k in shapes if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    proj_in = sorted(k for k in shapes if k.startswith(UNET) and k.endswith(".proj_in.weight"))
    if not to_k or not proj_in:
        raise ShapesUnclear("its UNet has no cross-attention layers")
    conv_in = _get(shapes, UNET + "input_blocks.0.0.weight")
    time_dim = _get(shapes, UNET + "time_embed.0.weight")[0]
    cfg = dict(base)
    cfg.update(
        in_channels=conv_in[1], out_channels=_get(shapes, UNET + "out.2.weight")[0], block_out_channels=widths,
        layers_per_block=lpb, cross_attention_dim=_get(shapes, to_k[0])[1],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attends],
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
        use_linear_projection=len(_get(shapes, proj_in[0])) == 2,
        norm_num_groups=_groups(widths, int(base.get("norm_num_groups", 32))),
        time_embedding_dim=None if time_dim == 4 * widths[0] else time_dim,
    )
    # Attention heads are not in any shape. Family convention: SD1 uses 8 heads in every level; SD2 and SDXL use
    # 64-wide heads (diffusers' `attention_head_dim` holds the head count), one head when a level is narrower.
    if family is Family.SD1:
        cfg["attention_head_dim"] = 8 if all(w % 8 == 0 for w in widths) else 1
    else:
        cfg["attention_head_dim"] = [w // 64 if w % 64 == 0 else 1 for w in widths]
    if family is Family.SDXL:
        label_in = _get(shapes, UNET + "label_emb.0.0.weight")[1]
        if pooled_dim is None or (label_in - pooled_dim) % 6:
            raise ShapesUnclear(f"its SDXL size embedding ({label_in} wide) does not fit its pooled text width")
        cfg.update(projection_class_embeddings_input_dim=label_in,
                   addition_time_embed_dim=(label_in - pooled_dim) // 6)
    return cfg


def derive_vae(shapes, base: dict) -> dict:
    levels = _indices(shapes, VAE + "encoder.down.")
    if not levels or levels != list(range(len(levels))):
        raise ShapesUnclear("its VAE encoder has no numbered down blocks")
    widths = [_get(shapes, VAE + f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels]
    cfg = dict(base)
    cfg.update(
        block_out_channels=widths, layers_per_block=len(_indices(shapes, VAE + "encoder.down.0.block.")),
        down_block_types=[base["down_block_types"][0]] * len(widths),
        up_block_types=[base["up_block_types"][0]] * len(widths),
        in_channels=_get(shapes, VAE + "encoder.conv_in.weight")[1],
        out_channels=_get(shapes, VAE + "decoder.conv_out.weight")[0],
        latent_channels=_get(shapes, VAE + "decoder.conv_in.weight")[1],
        use_quant_conv=VAE + "quant_conv.weight" in shapes,
        use_post_quant_conv=VAE + "post_quant_conv.weight" in shapes,
        mid_block_add_attention=_has(shapes, VAE + "encoder.mid.attn_1."),
        norm_num_groups=_groups(widths, int(base.get("norm_num_groups", 32))),
    )
    return cfg  # scaling_factor is not in any shape: the family's


def _heads(hidden: int) -> int:
    # Heads are not in any shape. Family convention (CLIP-L 768/12, OpenCLIP-H 1024/16, bigG 1280/20): 64 wide
    return hidden // 64 if hidden % 64 == 0 else 1


def derive_clip(shapes, prefix: str, base: dict) -> dict:
    """HF-CLIP layout (SD1, SDXL's first encoder)."""
    p = prefix + "text_model."
    vocab, hidden = _get(shapes, p + "embeddings.token_embedding.weight")
    layers = _indices(shapes, p + "encoder.layers.")
    if not layers:
        raise ShapesUnclear(f"it has no {p}encoder.layers.*")
    cfg = dict(base)
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=_heads(hidden),
               max_position_embeddings=_get(shapes, p + "embeddings.position_embedding.weight")[0],
               intermediate_size=_get(shapes, p + "encoder.layers.0.mlp.fc1.weight")[0])
    if "projection_dim" in cfg and base.get("projection_dim") == base.get("hidden_size"):
        cfg["projection_dim"] = hidden
    return cfg


def derive_openclip(shapes, prefix: str, base: dict) -> dict:
    """OpenCLIP layout (SD2, SDXL's second encoder)."""
    vocab, hidden = _get(shapes, prefix + "token_embedding.weight")
    layers = len(_indices(shapes, prefix + "transformer.resblocks."))
    if not layers:
        raise ShapesUnclear(f"it has no {prefix}transformer.resblocks.*")
    if prefix == SD2_OPENCLIP_PREFIX and layers == SD2_FULL_TEXT_LAYERS and hidden == 1024:
        layers -= 1  # SD2 reads the penultimate block: diffusers' SD2 text encoder stops there
    cfg = dict(base)
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=_heads(hidden),
               max_position_embeddings=_get(shapes, prefix + "positional_embedding")[0],
               intermediate_size=_get(shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0])
    if "CLIPTextModelWithProjection" in (base.get("architectures") or []):  # SDXL's second encoder: pooled width
        cfg["projection_dim"] = _get(shapes, prefix + "text_projection")[1]
    return cfg


def _read(family: Family, rel: str) -> dict:
    return json.loads((config_dir(family) / rel).read_text(encoding="utf-8"))


def derived_configs(header: Mapping[str, Any], family: Family) -> dict[str, str]:
    """The config files (relative name -> text, as ``carried.config_folder`` takes them) of a single file, derived
    from its safetensors header. Raises ``ShapesUnclear`` when its names and shapes do not describe the family."""
    family = Family(family)
    shapes = _shapes(header)
    root = config_dir(family)
    files = {rel.relative_to(root).as_posix(): rel.read_text(encoding="utf-8")
             for rel in sorted(root.rglob("*.json")) if rel.is_file()}
    pooled = None
    if family is Family.SD1:
        text = {"text_encoder": derive_clip(shapes, SD1_CLIP_PREFIX, _read(family, "text_encoder/config.json"))}
    elif family is Family.SD2:
        text = {"text_encoder": derive_openclip(shapes, SD2_OPENCLIP_PREFIX,
                                                _read(family, "text_encoder/config.json"))}
    else:
        te2 = derive_openclip(shapes, SDXL_OPENCLIP_PREFIX, _read(family, "text_encoder_2/config.json"))
        pooled = te2["projection_dim"]
        text = {"text_encoder": derive_clip(shapes, SDXL_CLIP_PREFIX, _read(family, "text_encoder/config.json")),
                "text_encoder_2": te2}
    parts = {"unet": derive_unet(shapes, family, _read(family, "unet/config.json"), pooled),
             "vae": derive_vae(shapes, _read(family, "vae/config.json")), **text}
    for name, cfg in parts.items():
        files[f"{name}/config.json"] = json.dumps(cfg, indent=2)
    return files

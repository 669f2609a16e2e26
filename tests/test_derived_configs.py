"""A single file another tool wrote (no lora_studio.configs metadata) of non-standard sizes loads without
--config-dir: its diffusers configs are derived from the tensor shapes in its header."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from test_export import unet_out
from tiny_families import tiny_pipeline

from lora_studio.configs import config_dir
from lora_studio.configs.derived import derived_configs
from lora_studio.errors import InputFileError
from lora_studio.family import Family
from lora_studio.ldm import pipeline_to_ldm_state_dict
from lora_studio.ldm.text import (SD1_CLIP_PREFIX, SD2_OPENCLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX,
                                  clip_to_ldm, openclip_to_ldm)
from lora_studio.ldm.unet import unet_to_ldm
from lora_studio.ldm.vae import vae_to_ldm
from lora_studio.models import load_base

# what no tensor shape tells: these follow the family's convention, so they may differ from the original's
NOT_IN_SHAPES = {"attention_head_dim", "num_attention_heads", "norm_num_groups", "upcast_attention", "sample_size",
                 "scaling_factor", "bos_token_id", "eos_token_id", "pad_token_id", "architectures", "hidden_act"}
BOOKKEEPING = {"dtype", "transformers_version"}
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _bare_file(pipe, path):
    """The pipeline as another tool would write it: original layout, no lora_studio.configs."""
    save_file({k: v.detach().clone().contiguous() for k, v in pipeline_to_ldm_state_dict(pipe).items()}, str(path))
    return path


def _config(module) -> dict:
    cfg = module.config
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unused = set() if hasattr(module, "text_projection") else {"projection_dim"}  # no projection, no tensor
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()
            if not k.startswith("_") and k not in NOT_IN_SHAPES | BOOKKEEPING | unused}


def _original(which):
    return load_base("demo").pipe if which == "demo" else tiny_pipeline(which)


@pytest.mark.parametrize("which", ["demo", Family.SD1, Family.SD2, Family.SDXL],
                         ids=lambda w: getattr(w, "value", w))
def test_file_without_carried_configs_loads_from_its_shapes(which, tmp_path):
    pipe = _original(which)
    back = load_base(str(_bare_file(pipe, tmp_path / "bare.safetensors")))  # no config_dir
    assert back.kind == "single_file"
    for name in PARTS:
        want = getattr(pipe, name, None)
        if want is None:
            continue
        got = getattr(back.pipe, name)
        got_cfg, want_cfg = _config(got), _config(want)
        shared = got_cfg.keys() & want_cfg.keys()
        assert {k: got_cfg[k] for k in shared} == {k: want_cfg[k] for k in shared}, name
        got_sd = got.state_dict()
        for key, t in want.state_dict().items():
            assert got_sd[key].shape == t.shape and torch.equal(got_sd[key], t), f"{name}.{key}"
    # the same weights in a UNet with the original's config, except what shapes cannot tell (heads, groups)
    fixed = {k: v for k, v in dict(back.pipe.unet.config).items() if k in NOT_IN_SHAPES}
    reference = type(pipe.unet).from_config({**dict(pipe.unet.config), **fixed})
    reference.load_state_dict(pipe.unet.state_dict())
    assert torch.allclose(unet_out(back.pipe), unet_out(SimpleNamespace(unet=reference)), atol=1e-5)


def _meta_header(family: Family) -> dict:
    """The header of a published-size file of ``family`` (shapes only, built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = config_dir(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
        parts = [unet_to_ldm(unet.state_dict(), unet.config)[0], vae_to_ldm(vae.state_dict(), vae.config)[0]]
        if family is Family.SD1:
            parts.append(clip_to_ldm(te.state_dict(), SD1_CLIP_PREFIX)[0])
        elif family is Family.SD2:
            parts.append(openclip_to_ldm(te.state_dict(), SD2_OPENCLIP_PREFIX, pad_to_layers=24)[0])
        else:
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2"))
            parts.append(clip_to_ldm(te.state_dict(), SDXL_CLIP_PREFIX)[0])
            parts.append(openclip_to_ldm(te2.state_dict(), SDXL_OPENCLIP_PREFIX)[0])
    return {k: {"shape": list(v.shape)} for part in parts for k, v in part.items()}


@pytest.mark.parametrize("family", [Family.SD1, Family.SD2, Family.SDXL], ids=lambda f: f.value)
def test_published_sizes_derive_the_shipped_configs(family):
    files = derived_configs(_meta_header(family), family)
    root = config_dir(family)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (root / name).is_dir():
            continue
        shipped = json.loads((root / name / "config.json").read_text(encoding="utf-8"))
        derived = json.loads(files[f"{name}/config.json"])
        assert {k: derived.get(k) for k in shipped} == shipped, name


def test_file_whose_shapes_cannot_be_mapped_names_the_config_dir_flag(tmp_path):
    state = {k: v.detach().clone().contiguous() for k, v in pipeline_to_ldm_state_dict(tiny_pipeline("sd1")).items()}
    del state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]  # a resnet without its first conv
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(InputFileError, match="--config-dir") as err:
        load_base(str(tmp_path / "broken.safetensors"))
    assert "it has no model.diffusion_model.input_blocks.1.0.in_layers.2.weight" in str(err.value)

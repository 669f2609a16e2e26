"""The diffusers -> original (ldm) single-file conversion, checked against diffusers' own reader (from_single_file)."""

from __future__ import annotations

import pytest
import torch
from tiny_families import tiny_config_dir, tiny_pipeline, write_ldm_checkpoint

from lora_studio.errors import ExportError, InputFileError
from lora_studio.family import Family
from lora_studio.fileio import read_safetensors_header
from lora_studio.ldm import detect_family_from_ldm_keys, pipeline_to_ldm_state_dict

FAMILIES = [Family.SD1, Family.SD2, Family.SDXL]
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.value)
def family_case(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(f"ldm-{family.value}")
    pipe = tiny_pipeline(family)
    path = write_ldm_checkpoint(pipe, folder / "model.safetensors")
    cfg = tiny_config_dir(family, folder / "config", pipe)
    return family, pipe, path, cfg


def test_layout_names(family_case):
    family, pipe, path, _ = family_case
    header, _ = read_safetensors_header(path)
    keys = set(header)
    # names every tool that reads the original layout looks for
    common = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
              "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.weight",
              "model.diffusion_model.middle_block.0.in_layers.2.weight",
              "model.diffusion_model.output_blocks.0.0.skip_connection.weight",
              "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
              "first_stage_model.decoder.mid.attn_1.proj_out.weight", "first_stage_model.encoder.norm_out.weight",
              "first_stage_model.quant_conv.weight"]
    per_family = {
        Family.SD1: ["cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
                     "cond_stage_model.transformer.text_model.embeddings.position_ids",
                     "cond_stage_model.transformer.text_model.final_layer_norm.weight"],
        Family.SD2: ["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
                     "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight",
                     "cond_stage_model.model.positional_embedding", "cond_stage_model.model.token_embedding.weight",
                     "cond_stage_model.model.ln_final.bias",
                     "model.diffusion_model.output_blocks.1.1.conv.weight"],  # UpBlock2D: upsampler right after resnet
        Family.SDXL: ["conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
                      "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias",
                      "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.logit_scale",
                      "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
                      "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",
                      "model.diffusion_model.output_blocks.1.2.conv.weight"],  # CrossAttnUpBlock2D: after the transformer
    }
    missing = [k for k in common + per_family[family] if k not in keys]
    assert not missing
    assert not any(k.startswith(("unet.", "vae.", "text_encoder")) or ".resnets." in k for k in keys)
    assert header["first_stage_model.encoder.mid.attn_1.k.weight"]["shape"][2:] == [1, 1]  # 1x1 conv shape
    if family is Family.SD2:
        w = header["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]["shape"]
        assert w == [3 * 1024, 1024]
    if family is Family.SDXL:
        assert header["conditioner.embedders.1.model.text_projection"]["shape"] == [1280, 32]  # (width, embed)


def test_detects_family_from_file_header(family_case):
    family, _, path, _ = family_case
    header, _ = read_safetensors_header(path)
    assert detect_family_from_ldm_keys(header) is family


def test_round_trip_through_diffusers_from_single_file(family_case):
    """diffusers' own ldm reader gives back exactly the weights we wrote, for every component."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family, pipe, path, cfg = family_case
    cls = StableDiffusionXLPipeline if family is Family.SDXL else StableDiffusionPipeline
    extra = {} if family is Family.SDXL else {"safety_checker": None, "requires_safety_checker": False}
    back = cls.from_single_file(str(path), config=str(cfg), local_files_only=True, **extra)
    for name in COMPONENTS:
        a = getattr(pipe, name, None)
        if a is None:
            continue
        sa, sb = a.state_dict(), getattr(back, name).state_dict()
        assert sa.keys() == sb.keys(), name
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, (name, different[:5])


def test_conversion_shares_storage_instead_of_copying():
    pipe = tiny_pipeline(Family.SD1)
    sd = pipeline_to_ldm_state_dict(pipe)
    w = pipe.unet.down_blocks[0].resnets[0].conv1.weight
    assert sd["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"].data_ptr() == w.data_ptr()
    q = pipe.vae.encoder.mid_block.attentions[0].to_q.weight
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].data_ptr() == q.data_ptr()
    params = sum(p.numel() for c in (pipe.unet, pipe.vae, pipe.text_encoder) for p in c.parameters())
    assert sum(t.numel() for t in sd.values() if t.is_floating_point()) == params


def test_unmappable_weights_are_listed():
    pipe = tiny_pipeline(Family.SD1)
    pipe.unet.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(1)))
    pipe.text_encoder.register_buffer("extra_buffer", torch.ones(2))
    with pytest.raises(ExportError) as err:
        pipeline_to_ldm_state_dict(pipe)
    assert "unet: extra_scale" in str(err.value) and "text_encoder: extra_buffer" in str(err.value)



@pytest.mark.parametrize("keys, needle", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}, "LoRA"),
    ({"down_blocks.0.resnets.0.conv1.weight": (32, 32, 3, 3)}, "diffusers"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}, "VAE"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
      "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}, "inpainting"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}, "refiner"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "no text encoder"),
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
      "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}, "1024 wide"),
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 48),
      "cond_stage_model.model.token_embedding.weight": (500, 64)}, "64-wide"),
])
def test_detect_refuses_what_it_cannot_load(keys, needle):
    with pytest.raises(InputFileError) as err:
        detect_family_from_ldm_keys(keys, "x.safetensors")
    assert needle in str(err.value) and "x.safetensors" in str(err.value)


@pytest.mark.parametrize("te_key, te_shape, width, family", [
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (49408, 768), 768, Family.SD1),
    ("cond_stage_model.model.token_embedding.weight", (49408, 1024), 1024, Family.SD2),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (500, 32), 32, Family.SD1),
])
def test_detect_accepts_real_and_toy_widths(te_key, te_shape, width, family):
    keys = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, width),
            te_key: te_shape}
    assert detect_family_from_ldm_keys(keys) is family

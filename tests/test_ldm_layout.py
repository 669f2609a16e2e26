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


def _meta_pipeline(family: Family):
    """The real-size architecture from the shipped configs, on the meta device (no memory, no weights)."""
    import types

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_studio.configs import config_dir

    folder = config_dir(family)
    with init_empty_weights():
        parts = dict(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
            if family is Family.SDXL else None)
    return types.SimpleNamespace(**parts)


@pytest.mark.parametrize("family, model_type", [(Family.SD1, "v1"), (Family.SD2, "v2"), (Family.SDXL, "xl_base")])
def test_real_size_layout_matches_diffusers_reader(family, model_type):
    """At full SD1.5 / SD2.1 / SDXL size (meta tensors), diffusers' own ldm readers recognise the model type and
    map every name back to the diffusers parameter of the same shape."""
    from diffusers.loaders import single_file_utils as sfu

    pipe = _meta_pipeline(family)
    sd = pipeline_to_ldm_state_dict(pipe, family)
    assert detect_family_from_ldm_keys(sd) is family
    assert sfu.infer_diffusers_model_type(sd) == model_type
    for name, convert in (("unet", sfu.convert_ldm_unet_checkpoint), ("vae", sfu.convert_ldm_vae_checkpoint)):
        module = getattr(pipe, name)
        back = convert(sd, module.config)
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back.items()} == want, name
    encoders = [(pipe.text_encoder, "cond_stage_model.model." if family is Family.SD2 else None)]
    if family is Family.SDXL:
        encoders.append((pipe.text_encoder_2, "conditioner.embedders.1.model."))
    for module, openclip_prefix in encoders:
        want = {k.removeprefix("text_model."): tuple(v.shape) for k, v in module.state_dict().items()}
        if openclip_prefix:
            back = sfu.convert_open_clip_checkpoint(module, sd, prefix=openclip_prefix)
        else:
            back = sfu.convert_ldm_clip_checkpoint(sd)
            back.pop("text_model.embeddings.position_ids")
        assert {k.removeprefix("text_model."): tuple(v.shape) for k, v in back.items()} == want
    if family is Family.SD2:  # written complete: 24 OpenCLIP blocks, the 24th an identity
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in sd
        assert tuple(sd["cond_stage_model.model.text_projection"].shape) == (1024, 1024)
    counts = {p: sum(k.startswith(p) for k in sd) for p in ("model.diffusion_model.", "first_stage_model.")}
    assert counts == {"model.diffusion_model.": 1680 if family is Family.SDXL else 686, "first_stage_model.": 248}


def test_sd2_padding_block_is_an_identity():
    """The 24th OpenCLIP block we add for a 23-block diffusers SD2 text encoder changes nothing it is applied to."""
    from lora_studio.ldm.text import openclip_to_ldm

    torch.manual_seed(0)
    width = 16
    layer = {"self_attn.q_proj": (width, width), "self_attn.k_proj": (width, width),
             "self_attn.v_proj": (width, width), "self_attn.out_proj": (width, width),
             "mlp.fc1": (4 * width, width), "mlp.fc2": (width, 4 * width)}
    sd = {f"encoder.layers.0.{m}.weight": torch.randn(s) for m, s in layer.items()}
    sd |= {f"encoder.layers.0.{m}.bias": torch.randn(s[0]) for m, s in layer.items()}
    sd |= {f"encoder.layers.0.layer_norm{i}.{p}": torch.randn(width) for i in (1, 2) for p in ("weight", "bias")}
    out, unmapped = openclip_to_ldm(sd, "m.", pad_to_layers=2)
    assert not unmapped
    block = {k.removeprefix("m.transformer.resblocks.1."): v for k, v in out.items() if ".resblocks.1." in k}
    x = torch.randn(5, width)
    h = torch.nn.functional.layer_norm(x, (width,), block["ln_1.weight"], block["ln_1.bias"])
    attn = torch.nn.MultiheadAttention(width, 2, batch_first=True)
    attn.load_state_dict({"in_proj_weight": block["attn.in_proj_weight"], "in_proj_bias": block["attn.in_proj_bias"],
                          "out_proj.weight": block["attn.out_proj.weight"], "out_proj.bias": block["attn.out_proj.bias"]})
    x1 = x + attn(h[None], h[None], h[None], need_weights=False)[0][0]
    h2 = torch.nn.functional.layer_norm(x1, (width,), block["ln_2.weight"], block["ln_2.bias"])
    mlp = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(
        h2, block["mlp.c_fc.weight"], block["mlp.c_fc.bias"])), block["mlp.c_proj.weight"], block["mlp.c_proj.bias"])
    assert torch.equal(x1 + mlp, x)
    # and the fused q/k/v of the real block stacks q, k, v in that order
    assert torch.equal(out["m.transformer.resblocks.0.attn.in_proj_weight"][width:2 * width],
                       sd["encoder.layers.0.self_attn.k_proj.weight"])

"""Interop with real LoRA files made elsewhere (../shared/real-loras, fixture ``real_loras``).

The SD1.5 UNet and CLIP-L text encoder are built from their configs on the meta device
(accelerate.init_empty_weights): module names and shapes are real, no memory is spent on weights.
"""

from __future__ import annotations

import types

import pytest
import torch

from lora_studio.errors import FamilyMismatchError, LoraFormatError
from lora_studio.family import Family
from lora_studio.lora.formats import read_lora
from lora_studio.lora.keys import match_modules
from lora_studio.lora.math import module_delta
from lora_studio.mix import LoraMixer

FALCONS = {"smart_falcon_4_lokr.safetensors": 4, "smart_falcon_8_lokr.safetensors": 8,
           "smart_falcon_16_lokr.safetensors": 16}


@pytest.fixture(scope="module")
def sd15():
    """An SD1.5-shaped 'pipeline' (UNet + CLIP-L text encoder) on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"))
    return types.SimpleNamespace(unet=unet, text_encoder=text)


@pytest.mark.parametrize("file", sorted(FALCONS))
def test_smart_falcon_lokr_maps_completely_onto_sd15(real_loras, sd15, file):
    lf = read_lora(real_loras / file)
    assert len(lf.modules) == 350 and lf.format == "kohya" and lf.family is Family.SD1
    assert {m.kind for m in lf.modules.values()} == {"lokr"}
    assert {m.rank for m in lf.modules.values()} == {FALCONS[file]}
    assert all(m.alpha == float(lf.metadata["ss_network_alpha"]) for m in lf.modules.values())
    assert all(set(m.tensors) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"} for m in lf.modules.values())
    result = match_modules(lf, sd15)  # also checks every delta's shape against the module's weight
    assert result.unmatched == [] and len(result.matched) == 350
    comps = {c for c, _ in result.matched.values()}
    assert comps == {"unet", "text_encoder"}
    assert sum(c == "text_encoder" for c, _ in result.matched.values()) == 12 * 6
    convs = [m for c, m in result.matched.values() if isinstance(sd15.unet.get_submodule(m) if c == "unet" else None,
                                                                 torch.nn.Conv2d)]
    assert any(m.endswith("resnets.0.conv1") for m in convs)  # resnet convs are covered too
    mixer = LoraMixer(sd15)
    name = mixer.add(lf)
    assert mixer.entries[0].matched == 350 and mixer.entries[0].unmatched == [] and name == file[:-12]


def test_smart_falcon_deltas_are_finite_and_follow_kron(real_loras, sd15):
    lf = read_lora(real_loras / "smart_falcon_4_lokr.safetensors")
    result = match_modules(lf, sd15)
    for kname, (comp, module) in list(result.matched.items())[::25]:
        shape = tuple(getattr(sd15, comp).get_submodule(module).weight.shape)
        d = module_delta(lf.modules[kname], shape)
        assert d.shape == shape and bool(torch.isfinite(d).all())
        t = {k: v.double() for k, v in lf.modules[kname].tensors.items()}
        want = torch.kron(t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(shape)
        torch.testing.assert_close(d.double(), want, atol=1e-4, rtol=1e-3)  # alpha = rank: scale 1


def test_flux_lora_claiming_sd15_is_refused(real_loras):
    with pytest.raises(FamilyMismatchError) as err:
        read_lora(real_loras / "flux_lora_mislabelled_sd15.safetensors")
    msg = str(err.value)
    assert "FLUX" in msg and "claims SD 1.x" in msg and "single_transformer_blocks" in msg


@pytest.mark.parametrize("file,rank,tokens", [("lora_disney.safetensors", 1, ["<s1>", "<s2>"]),
                                               ("analog_svd_rank4.safetensors", 4, []),
                                               ("lora_disney_inpainting.safetensors", 1, ["<s1>", "<s2>"])])
def test_cloneofsimo_files_map_by_position_onto_sd15(real_loras, sd15, file, rank, tokens):
    lf = read_lora(real_loras / file)
    assert lf.format == "cloneofsimo" and lf.family is Family.SD1 and sorted(lf.embeddings) == tokens
    assert len(lf.modules) == 144 + 48 and {m.rank for m in lf.modules.values()} == {rank}
    assert all(m.alpha is None and m.scale == 1.0 for m in lf.modules.values())  # cloneofsimo scale is 1
    result = match_modules(lf, sd15)  # every position's shape fits the module it is mapped to
    assert result.unmatched == [] and len(result.matched) == 192
    # position 4 of each transformer block is its 8x-wide GEGLU projection in these (older diffusers) files
    ff = lf.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"]
    assert tuple(ff.tensors["lora_up.weight"].shape) == (2560, rank)
    mixer = LoraMixer(sd15)
    if tokens:
        with pytest.raises(LoraFormatError, match="token embeddings"):
            mixer.add(lf)
        mixer.add(lf, allow_partial=True)
        assert mixer.entries[0].unmatched == [f"<embedding {t}>" for t in tokens]
    else:
        mixer.add(lf)
        assert mixer.entries[0].matched == 192


def test_cloneofsimo_file_that_cannot_be_placed_is_refused(real_loras, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(real_loras / "analog_svd_rank4.safetensors"))
    # position 10 is attn1.to_k of the second transformer: give it attn2.to_k's (320 x 768) factors
    sd["unet:10:up"], sd["unet:10:down"] = sd["unet:6:up"].clone(), sd["unet:6:down"].clone()
    from safetensors import safe_open
    with safe_open(str(real_loras / "analog_svd_rank4.safetensors"), "pt") as fh:
        meta = fh.metadata()
    save_file(sd, str(tmp_path / "shuffled.safetensors"), metadata=meta)
    with pytest.raises(LoraFormatError, match="cloneofsimo.*cannot be placed.*position 10"):
        read_lora(tmp_path / "shuffled.safetensors")

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
    for kname, (comp, module) in list(result.matched.items())[::7]:
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


@pytest.mark.parametrize("file", ["lora_disney.safetensors", "analog_svd_rank4.safetensors"])
def test_cloneofsimo_files_are_refused_naming_the_format(real_loras, file):
    with pytest.raises(LoraFormatError, match="cloneofsimo"):
        read_lora(real_loras / file)

"""The LoRA inspector: metadata, family, kinds, rank/alpha, touched blocks, trigger words; and its CLI."""

from __future__ import annotations

import json

import pytest
import torch

import lora_factories as F
from lora_studio.cli.main import main
from lora_studio.family import Family
from lora_studio.fileio import save_safetensors_atomic
from lora_studio.lora.inspect import format_lora_info, inspect_lora


@pytest.fixture(scope="module")
def pipe():
    return F.demo_or_random_pipeline()


TAGS = {"10_stripes": {"stripes": 24, "a red circle": 5, "a blue square": 3}}


def test_inspect_kohya_locon_with_metadata(tmp_path, pipe):
    path = F.write_kohya_lora(tmp_path / "s.safetensors", pipe, rank=4, alpha=2.0, conv=True, metadata={
        "ss_tag_frequency": json.dumps(TAGS), "modelspec.title": "Stripes", "modelspec.trigger_phrase": "stripes"})
    info = inspect_lora(path)
    assert info.format == "kohya" and info.family is Family.SD1 and info.kinds == ["LoRA", "LoCon"]
    assert info.dtypes == {"F32": info.tensor_count} and info.size_bytes == path.stat().st_size
    assert {(m.kind, m.rank, m.alpha) for m in info.modules} == {("LoRA", 4, 2.0), ("LoCon", 4, 2.0)}
    assert info.groups["UNet down.0"] > 0 and info.groups["UNet mid"] > 0 and info.groups["text encoder layer 1"] == 6
    assert sum(info.groups.values()) == len(info.modules)
    assert info.trigger_words == ["stripes"]  # modelspec trigger phrase and the kohya folder name, once
    assert info.top_tags[0] == ("stripes", 24)
    text = format_lora_info(info)
    for part in ("Family:   SD 1.x", "LoCon", "rank 4", "alpha 2", "UNet up.1", "modelspec.title = Stripes",
                 "Trigger words: stripes", "stripes (24)"):
        assert part in text, part
    assert "lora_unet_up_blocks_1_resnets_0_conv1" in format_lora_info(info, all_modules=True)


def test_inspect_shows_lycoris_kinds_and_dora(tmp_path, pipe):
    assert inspect_lora(F.write_lokr(tmp_path / "k.safetensors", pipe)).kinds == ["LoKr"]
    assert inspect_lora(F.write_loha(tmp_path / "h.safetensors", pipe)).kinds == ["LoHa"]
    info = inspect_lora(F.write_dora(tmp_path / "d.safetensors", pipe))
    assert "DoRA" in info.kinds and {m.kind for m in info.modules} == {"LoRA+DoRA"}
    info = inspect_lora(F.write_kohya_lora(tmp_path / "n.safetensors", pipe, alpha=None))
    assert "alpha none (= rank)" in format_lora_info(info)


def test_inspect_real_lokr_and_cli(real_loras, capsys):
    info = inspect_lora(real_loras / "smart_falcon_4_lokr.safetensors")
    assert len(info.modules) == 350 and info.kinds == ["LoKr"] and info.family is Family.SD1
    assert info.dtypes == {"F16": 1750}
    assert "smf girl" in info.trigger_words and info.top_tags[0][0] == "smart falcon \\(umamusume\\)"
    assert main(["inspect", str(real_loras / "smart_falcon_4_lokr.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "LoKr       rank 4    alpha 4" in out and "text encoder layer 11" in out and "ss_network_module" in out


def test_inspect_refused_and_positional_files(real_loras, capsys):
    assert main(["inspect", str(real_loras / "flux_lora_mislabelled_sd15.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "FLUX" in out and "ss_base_model_version = sd_1.5" in out
    assert main(["inspect", "--json", str(real_loras / "lora_disney.safetensors")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "cloneofsimo" and data["family"] == "sd1" and data["tensor_count"] == 386
    assert data["problem"] is None and len(data["modules"]) == 192 and "cloneofsimo layout" in data["notes"][0]


def test_inspect_checkpoint_is_not_a_lora(tmp_path, capsys):
    save_safetensors_atomic({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                             "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)},
                            tmp_path / "ckpt.safetensors")
    assert main(["inspect", str(tmp_path / "ckpt.safetensors")]) == 0
    assert "not a LoRA" in capsys.readouterr().out

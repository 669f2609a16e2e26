"""Every checkpoint the app writes, the app can open again: merged single files of non-standard sizes (the demo
model, the tiny test families) load back as a base without a config folder, and serve as --tuned in extract."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_export import make_lora, reference_merge, text_out, unet_out
from tiny_families import tiny_pipeline

from lora_studio.cli.main import main
from lora_studio.errors import InputFileError
from lora_studio.export import export_merged_checkpoint
from lora_studio.family import Family
from lora_studio.fileio import read_safetensors_header
from lora_studio.models import load_base


def _weights_equal(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        for key, t in want.items():
            if key.endswith("position_ids"):
                continue
            assert torch.allclose(got[key].float(), t.float(), atol=1e-6), f"{name}.{key}"


def test_demo_export_loads_back_as_a_base_and_serves_as_tuned_in_extract(demo_model_dir, demo_pipe, tmp_path,
                                                                          capsys):
    lora = make_lora(demo_pipe, tmp_path / "style.safetensors", seed=3, rank=4, scale=0.25)
    merged = tmp_path / "merged.safetensors"
    assert main(["export", "--base", "demo", "--lora", f"{tmp_path / 'style.safetensors'}:0.8", "--out",
                 str(merged), "--dtype", "fp32"]) == 0

    back = load_base(str(merged))  # no --config-dir: the demo's sizes are not SD 1.5's
    assert back.family is Family.SD1 and back.kind == "single_file"
    reference_merge(demo_pipe, [(lora, 0.8)])
    _weights_equal(demo_pipe, back.pipe)

    def render(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, generator=g, height=64, width=64,
                    output_type="np").images[0]

    assert abs(render(back.pipe) - render(demo_pipe)).max() < 2e-3  # same tokenizer, scheduler, weights

    out = tmp_path / "extracted.safetensors"
    capsys.readouterr()
    assert main(["extract", "--tuned", str(merged), "--base", "demo", "--out", str(out), "--rank",
                 "4", "--dtype", "fp32"]) == 0
    assert len(load_file(str(out))) > 0

    again = tmp_path / "again.safetensors"  # a merged file is itself a base to export from (the streamed path)
    assert main(["export", "--base", str(merged), "--lora", f"{tmp_path / 'style.safetensors'}:0.0", "--out",
                 str(again), "--dtype", "fp32"]) == 0
    _weights_equal(back.pipe, load_base(str(again)).pipe)


def test_non_standard_file_without_configs_names_the_config_dir_flag(demo_model_dir, tmp_path):
    """Without carried configs a non-standard file loads from its shapes (test_derived_configs.py); one whose shapes
    do not describe a model (here: the second level's first resnet lacks a conv) still names --config-dir."""
    merged = tmp_path / "merged.safetensors"
    export_merged_checkpoint(str(demo_model_dir), [], merged, dtype="fp32")
    _, meta = read_safetensors_header(merged)
    tensors = load_file(str(merged))
    del tensors["model.diffusion_model.input_blocks.3.0.in_layers.2.weight"]
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare), {k: v for k, v in meta.items() if k != "lora_studio.configs"})
    with pytest.raises(InputFileError, match="--config-dir") as err:
        load_base(str(bare))
    assert "could not be derived from its tensor shapes" in str(err.value)


@pytest.mark.parametrize("family", [Family.SD1, Family.SD2, Family.SDXL], ids=lambda f: f.value)
def test_tiny_family_export_loads_back_without_a_config_folder(family, tmp_path):
    pipe = tiny_pipeline(family)
    lora = make_lora(pipe, tmp_path / "a.safetensors", seed=1)
    res = export_merged_checkpoint(pipe, [(tmp_path / "a.safetensors", 0.7)], tmp_path / "m.safetensors",
                                   dtype="fp32")
    live = tiny_pipeline(family)
    reference_merge(live, [(lora, 0.7)])
    back = load_base(str(res.out))
    assert back.family is family
    assert torch.allclose(unet_out(back.pipe), unet_out(live), atol=1e-5)
    assert torch.allclose(text_out(back.pipe.text_encoder), text_out(live.text_encoder), atol=1e-5)
    if family is Family.SDXL:
        assert torch.allclose(text_out(back.pipe.text_encoder_2), text_out(live.text_encoder_2), atol=1e-5)

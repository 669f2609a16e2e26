"""Merged-checkpoint export: round trip through diffusers' from_single_file, atomicity, non-finite refusal."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_families import tiny_config_dir, tiny_pipeline, write_ldm_checkpoint

from lora_studio.errors import ExportError, LoraFormatError
from lora_studio.family import Family
from lora_studio.fileio import read_safetensors_header
from lora_studio.lora.formats import LoraModule
from lora_studio.lora.writer import save_kohya_lora
from lora_studio.lora.keys import TE1_PREFIX, TE2_PREFIX, TE_PREFIX, UNET_PREFIX, kohya_module_name

ATTN = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0")


def make_lora(pipe, path, seed: int, rank: int = 2, scale: float = 0.3, alpha: float = 1.0, te: bool = True):
    """A random kohya LoRA on the pipeline's attention projections, one resnet conv and the text encoder(s)."""
    g = torch.Generator().manual_seed(seed)
    parts = [(UNET_PREFIX, pipe.unet, ATTN + ("resnets.0.conv1",))]
    if te:
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        parts.append((TE1_PREFIX if sdxl else TE_PREFIX, pipe.text_encoder, ("self_attn.q_proj", "mlp.fc1")))
        if sdxl:
            parts.append((TE2_PREFIX, pipe.text_encoder_2, ("self_attn.v_proj",)))
    modules = {}
    for prefix, model, suffixes in parts:
        for name, mod in model.named_modules():
            if not name.endswith(suffixes):
                continue
            w = mod.weight
            down = torch.randn(rank, *w.shape[1:], generator=g) * scale
            up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * scale
            kname = kohya_module_name(prefix, name)
            modules[kname] = LoraModule.from_updown(kname, down, up, alpha)
    save_kohya_lora(modules, path, {"ss_network_dim": str(rank)})
    return modules


def reference_merge(pipe, lora_specs):
    """Independent reference: W += strength * up @ down * alpha / rank, written out per module."""
    index = {}
    for prefix, model in [(UNET_PREFIX, pipe.unet), (TE_PREFIX, pipe.text_encoder), (TE1_PREFIX, pipe.text_encoder),
                          (TE2_PREFIX, getattr(pipe, "text_encoder_2", None))]:
        if model is not None:
            for name, mod in model.named_modules():
                index[kohya_module_name(prefix, name)] = mod
    with torch.no_grad():
        for modules, strength in lora_specs:
            for kname, m in modules.items():
                w = index[kname].weight
                up, down = m.tensors["lora_up.weight"], m.tensors["lora_down.weight"]
                delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (m.alpha / m.rank)
                w += strength * delta


def unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=ctx, **kwargs).sample


def text_out(te):
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        return te(ids)[0]


def load_single_file(family, path, cfg):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family is Family.SDXL else StableDiffusionPipeline
    return cls.from_single_file(str(path), config=str(cfg), local_files_only=True, torch_dtype=torch.float32)


@pytest.mark.parametrize("family", [Family.SD1, pytest.param(Family.SD2, marks=pytest.mark.slow),
                                    pytest.param(Family.SDXL, marks=pytest.mark.slow)], ids=lambda f: f.value)
def test_single_file_round_trip_equals_live_merge(family, tmp_path):
    from lora_studio.export import export_merged_checkpoint

    pipe = tiny_pipeline(family)
    cfg = tiny_config_dir(family, tmp_path / "config", pipe)
    a = make_lora(pipe, tmp_path / "a.safetensors", seed=1)
    b = make_lora(pipe, tmp_path / "b.safetensors", seed=2, rank=3, alpha=3.0)
    before = unet_out(pipe)
    res = export_merged_checkpoint(pipe, [(tmp_path / "a.safetensors", 0.8), (tmp_path / "b.safetensors", -0.5)],
                                   tmp_path / "merged.safetensors", dtype="fp32")
    assert res.family is family and res.modules_changed == len(set(a) | set(b))
    assert torch.equal(unet_out(pipe), before)  # the caller's pipeline is given back unchanged

    live = tiny_pipeline(family)
    reference_merge(live, [(a, 0.8), (b, -0.5)])
    back = load_single_file(family, res.out, cfg)
    want, got = unet_out(live), unet_out(back)
    assert not torch.allclose(want, before, atol=1e-3)  # the LoRAs do change the output
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(text_out(back.text_encoder), text_out(live.text_encoder), atol=1e-5)
    if family is Family.SDXL:
        assert torch.allclose(text_out(back.text_encoder_2), text_out(live.text_encoder_2), atol=1e-5)

    _, meta = read_safetensors_header(res.out)
    merged = json.loads(meta["lora_studio.merged_loras"])
    assert [(m["name"], m["strength"]) for m in merged] == [("a.safetensors", 0.8), ("b.safetensors", -0.5)]
    assert all(len(m["sha256"]) == 64 for m in merged)
    assert meta["modelspec.architecture"].startswith("stable-diffusion-")
    assert not meta["modelspec.architecture"].endswith("/lora")


def test_fp16_export_halves_the_file_and_stays_close(tmp_path):
    from lora_studio.export import export_merged_checkpoint

    pipe = tiny_pipeline(Family.SD1)
    cfg = tiny_config_dir(Family.SD1, tmp_path / "config", pipe)
    a = make_lora(pipe, tmp_path / "a.safetensors", seed=1)
    r32 = export_merged_checkpoint(pipe, [(tmp_path / "a.safetensors", 1.0)], tmp_path / "m32.safetensors", dtype="fp32")
    r16 = export_merged_checkpoint(pipe, [(tmp_path / "a.safetensors", 1.0)], tmp_path / "m16.safetensors", dtype="fp16")
    header, _ = read_safetensors_header(r16.out)
    assert {v["dtype"] for v in header.values()} <= {"F16", "I64"}
    assert r16.bytes < 0.6 * r32.bytes
    live = tiny_pipeline(Family.SD1)
    reference_merge(live, [(a, 1.0)])
    back = load_single_file(Family.SD1, r16.out, cfg)
    assert torch.allclose(unet_out(back.to(torch.float32)), unet_out(live), atol=2e-2)


def test_interrupted_export_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import lora_studio.fileio.tensors as fileio
    from lora_studio.export import export_merged_checkpoint

    pipe = tiny_pipeline(Family.SD1)
    make_lora(pipe, tmp_path / "a.safetensors", seed=1)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"previous export")

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 1000)  # a half-written file under the temporary name
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio, "save_file", half_then_fail)
    with pytest.raises(ExportError, match="No space left"):
        export_merged_checkpoint(pipe, [(tmp_path / "a.safetensors", 1.0)], out, dtype="fp32")
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "merged.safetensors"]

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")
    with pytest.raises(ExportError, match="cannot write into"):
        export_merged_checkpoint(pipe, [(tmp_path / "a.safetensors", 1.0)], blocked / "m.safetensors", dtype="fp32")


def test_non_finite_merge_refuses_to_write(tmp_path):
    from lora_studio.export import export_merged_checkpoint

    pipe = tiny_pipeline(Family.SD1)
    make_lora(pipe, tmp_path / "a.safetensors", seed=1, scale=300.0)  # deltas ~1e5: beyond fp16's 65504
    with pytest.raises(ExportError, match="NaN or inf"):
        export_merged_checkpoint(pipe, [(tmp_path / "a.safetensors", 1.0)], tmp_path / "m.safetensors", dtype="fp16")
    assert not (tmp_path / "m.safetensors").exists()


def test_lora_for_another_model_is_refused_before_writing(tmp_path):
    from lora_studio.export import export_merged_checkpoint

    pipe = tiny_pipeline(Family.SD1)
    modules = {"lora_unet_no_such_block_to_q": LoraModule.from_updown(
        "lora_unet_no_such_block_to_q", torch.randn(2, 32), torch.randn(32, 2))}
    save_kohya_lora(modules, tmp_path / "odd.safetensors")
    with pytest.raises(LoraFormatError, match="no_such_block"):
        export_merged_checkpoint(pipe, [(tmp_path / "odd.safetensors", 1.0)], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_export_of_the_live_mix_keeps_block_and_text_encoder_weights(tmp_path):
    from lora_studio.export import export_merged_checkpoint
    from lora_studio.mix import LoraMixer

    pipe = tiny_pipeline(Family.SD1)
    cfg = tiny_config_dir(Family.SD1, tmp_path / "config", pipe)
    make_lora(pipe, tmp_path / "a.safetensors", seed=1)
    make_lora(pipe, tmp_path / "b.safetensors", seed=2)
    mixer = LoraMixer(pipe)
    mixer.add(tmp_path / "a.safetensors", strength=0.9, te_strength=0.2, block_weights={"up": 0.0})
    mixer.add(tmp_path / "b.safetensors", strength=0.4)
    mixer.apply()
    live_unet, live_text = unet_out(pipe), text_out(pipe.text_encoder)
    res = export_merged_checkpoint(None, mixer, tmp_path / "live.safetensors", dtype="fp32")
    assert torch.equal(unet_out(pipe), live_unet)  # the mix is still applied afterwards
    back = load_single_file(Family.SD1, res.out, cfg)
    assert torch.allclose(unet_out(back), live_unet, atol=1e-5)
    assert torch.allclose(text_out(back.text_encoder), live_text, atol=1e-5)
    rec = json.loads(read_safetensors_header(res.out)[1]["lora_studio.merged_loras"])
    assert rec[0]["te_strength"] == 0.2 and rec[0]["block_weights"] == {"up": 0.0}
    mixer.restore()
    assert not torch.allclose(unet_out(pipe), live_unet, atol=1e-4)


@pytest.mark.slow
def test_diffusers_folder_export_from_a_single_file_base_and_cli(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from lora_studio.cli.main import main
    from lora_studio.export import MERGE_INFO_FILE, export_merged_checkpoint

    pipe = tiny_pipeline(Family.SD1)
    cfg = tiny_config_dir(Family.SD1, tmp_path / "config", pipe)
    base = write_ldm_checkpoint(pipe, tmp_path / "base.safetensors", {"modelspec.title": "tiny base"})
    a = make_lora(pipe, tmp_path / "a.safetensors", seed=1)
    reference_merge(pipe, [(a, 0.7)])
    out = tmp_path / "merged-diffusers"
    (out / "stale").mkdir(parents=True)  # an earlier export is replaced as a whole
    res = export_merged_checkpoint(str(base), [(tmp_path / "a.safetensors", 0.7)], out, fmt="diffusers",
                                   dtype="fp32", config_dir=str(cfg))
    assert res.out == out and not (out / "stale").exists()
    assert json.loads((out / MERGE_INFO_FILE).read_text())["merged_loras"][0]["strength"] == 0.7
    back = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert torch.allclose(unet_out(back), unet_out(pipe), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left

    rc = main(["export", "--base", str(base), "--lora", f"{tmp_path / 'a.safetensors'}:0.7",
               "--out", str(tmp_path / "cli.safetensors"), "--dtype", "fp32", "--config-dir", str(cfg)])
    assert rc == 0 and "merged a.safetensors:0.7" in capsys.readouterr().out
    _, meta = read_safetensors_header(tmp_path / "cli.safetensors")
    assert meta["modelspec.title"] == "cli"
    back = load_single_file(Family.SD1, tmp_path / "cli.safetensors", cfg)
    assert torch.allclose(unet_out(back), unet_out(pipe), atol=1e-5)
    assert main(["export", "--lora", "x.safetensors", "--out", str(tmp_path / "y.safetensors")]) == 2


def test_demo_model_render_from_exported_file_equals_live_mix(demo_model_dir, demo_pipe, tmp_path):
    """The issue's round trip on the shipped demo model: images rendered from the exported single file (loaded
    back through models.load_pipeline / from_single_file) equal those of the live LoraMixer mix."""
    import numpy as np

    from lora_studio.export import export_merged_checkpoint
    from lora_studio.mix import LoraMixer
    from lora_studio.models import load_pipeline

    make_lora(demo_pipe, tmp_path / "style.safetensors", seed=3, rank=4, scale=0.25)

    def render(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=4, guidance_scale=3.0, generator=g, height=64, width=64,
                    output_type="np").images[0]

    plain = render(demo_pipe)
    mixer = LoraMixer(demo_pipe)
    mixer.add(tmp_path / "style.safetensors", strength=0.8)
    mixer.apply()
    live = render(demo_pipe)
    res = export_merged_checkpoint(str(demo_model_dir), [(tmp_path / "style.safetensors", 0.8)],
                                   tmp_path / "demo-merged.safetensors", dtype="fp32")
    back = load_pipeline(res.out, config_dir=demo_model_dir).pipe
    back.set_progress_bar_config(disable=True)
    got = render(back)
    assert np.abs(live - plain).max() > 0.05  # the LoRA visibly changes the picture
    assert np.abs(got - live).max() < 2e-3


def test_stop_request_writes_nothing_and_gives_the_pipeline_back(tmp_path):
    from lora_studio.errors import StopRequested
    from lora_studio.export import export_merged_checkpoint
    from lora_studio.progress import StopFlag

    pipe = tiny_pipeline(Family.SD1)
    make_lora(pipe, tmp_path / "a.safetensors", seed=1)
    before = unet_out(pipe)
    flag = StopFlag()

    def stop_midway(ev):
        if ev.stage == "merge" and ev.current == 3:
            flag.request()

    with pytest.raises(StopRequested, match="nothing was written"):
        export_merged_checkpoint(pipe, [(tmp_path / "a.safetensors", 1.0)], tmp_path / "m.safetensors",
                                 progress=stop_midway, stop=flag)
    assert not (tmp_path / "m.safetensors").exists()
    assert torch.equal(unet_out(pipe), before)

"""The streamed single-file export (lora_studio.export_stream): same bytes as the in-memory export, tensor by
tensor, for SD1, SD2 (fused OpenCLIP q/k/v) and SDXL layouts; errors before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_export import load_single_file, make_lora, reference_merge, text_out, unet_out
from tiny_families import tiny_config_dir, tiny_pipeline, write_ldm_checkpoint

from lora_studio.configs import config_dir
from lora_studio.errors import ExportError, InputFileError, StopRequested
from lora_studio.family import Family
from lora_studio.fileio import read_safetensors_header
from lora_studio.lora.formats import LoraModule
from lora_studio.lora.keys import TE2_PREFIX, TE_PREFIX, kohya_module_name
from lora_studio.lora.writer import save_kohya_lora


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _inputs(family, tmp_path, **lora_kw):
    pipe = tiny_pipeline(family)
    cfg = tiny_config_dir(family, tmp_path / "config", pipe)
    base = write_ldm_checkpoint(pipe, tmp_path / "base.safetensors", {"modelspec.title": "tiny base"})
    mods = make_lora(pipe, tmp_path / "a.safetensors", seed=1, **lora_kw)
    return pipe, cfg, base, mods


@pytest.mark.parametrize("family", [Family.SD1, Family.SD2, Family.SDXL], ids=lambda f: f.value)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_streamed_export_equals_the_in_memory_export(family, dtype, tmp_path, monkeypatch):
    import lora_studio.export.checkpoint as export
    from lora_studio.models import describe_checkpoint, load_pipeline

    pipe, cfg, base, mods = _inputs(family, tmp_path)
    if family is not Family.SD1:  # a q/k/v target of the OpenCLIP encoder lands in a third of in_proj_weight
        te = pipe.text_encoder_2 if family is Family.SDXL else pipe.text_encoder
        prefix = TE2_PREFIX if family is Family.SDXL else TE_PREFIX
        name = next(n for n, _ in te.named_modules() if n.endswith("layers.0.self_attn.k_proj"))
        w = te.get_submodule(name).weight
        kname = kohya_module_name(prefix, name)
        mods[kname] = LoraModule.from_updown(kname, torch.randn(2, w.shape[1]) * 0.3, torch.randn(w.shape[0], 2) * 0.3,
                                             1.0)
        save_kohya_lora(mods, tmp_path / "a.safetensors")
    loras = [(tmp_path / "a.safetensors", 0.8)]
    calls = []
    real_load = export._load_base
    monkeypatch.setattr(export, "_load_base", lambda *a: calls.append(a) or real_load(*a))
    streamed = export.export_merged_checkpoint(str(base), loras, tmp_path / "s.safetensors", dtype=dtype,
                                               config_dir=str(cfg))
    assert calls == []  # the streamed path never loads the pipeline
    loaded = load_pipeline(str(base), config_dir=cfg)
    in_memory = export.export_merged_checkpoint(loaded, loras, tmp_path / "m.safetensors", dtype=dtype)
    assert streamed.modules_changed == in_memory.modules_changed == len(mods)

    got, want = _tensors(streamed.out), _tensors(in_memory.out)
    assert set(want) <= set(got)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    src = _tensors(base)
    changed = [k for k in got if not torch.equal(got[k], src[k].to(got[k].dtype))]
    assert changed  # the merge did change tensors, and only those the LoRA targets
    assert len(changed) <= len(mods)
    _, meta = read_safetensors_header(streamed.out)
    assert meta["modelspec.title"] == "s" and json.loads(meta["lora_studio.merged_loras"])[0]["strength"] == 0.8
    # the base's prediction type, in the model spec's spelling, for the inspector and for loading back
    want = {"epsilon": "epsilon", "v_prediction": "v"}[loaded.pipe.scheduler.config.prediction_type]
    assert want == ("v" if family is Family.SD2 else "epsilon")
    for res in (streamed, in_memory):
        assert describe_checkpoint(res.out)["metadata"]["modelspec.prediction_type"] == want

    if dtype == "fp32":  # and what loads back is the LoRA merged, checked against an independent merge
        live = tiny_pipeline(family)
        reference_merge(live, [(mods, 0.8)])
        back = load_single_file(family, streamed.out, cfg)
        assert torch.allclose(unet_out(back), unet_out(live), atol=1e-5)
        te_back, te_live = ((back.text_encoder_2, live.text_encoder_2) if family is Family.SDXL
                            else (back.text_encoder, live.text_encoder))
        assert torch.allclose(text_out(te_back), text_out(te_live), atol=1e-5)


def test_streamed_export_drops_ema_and_keeps_integer_tensors(tmp_path):
    from lora_studio.export import export_merged_checkpoint
    from lora_studio.fileio import load_safetensors, save_safetensors_atomic

    _, cfg, base, _ = _inputs(Family.SD1, tmp_path)
    sd, meta = load_safetensors(base)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelconv_in"] = torch.zeros(3)
    save_safetensors_atomic(sd, base, meta)
    res = export_merged_checkpoint(str(base), [(tmp_path / "a.safetensors", 1.0)], tmp_path / "o.safetensors",
                                   dtype="fp16", config_dir=str(cfg))
    header, _ = read_safetensors_header(res.out)
    assert not any(k.startswith("model_ema.") for k in header)
    assert header["cond_stage_model.transformer.text_model.embeddings.position_ids"]["dtype"] == "I64"
    assert {v["dtype"] for v in header.values()} == {"F16", "I64"}
    assert len(header) == len(sd) - 2


def test_streamed_export_refuses_overflow_stop_and_wrong_configs_leaving_nothing(tmp_path):
    from lora_studio.export import export_merged_checkpoint
    from lora_studio.progress import StopFlag

    pipe, cfg, base, _ = _inputs(Family.SD1, tmp_path, scale=300.0)  # deltas ~1e5: beyond fp16's range
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="NaN or inf"):
        export_merged_checkpoint(str(base), [(tmp_path / "a.safetensors", 1.0)], out, dtype="fp16",
                                 config_dir=str(cfg))
    flag = StopFlag()

    def stop_midway(ev):
        if ev.stage == "write" and ev.current == 5:
            flag.request()

    with pytest.raises(StopRequested, match="nothing was written"):
        export_merged_checkpoint(str(base), [(tmp_path / "a.safetensors", 0.0)], out, dtype="fp32",
                                 config_dir=str(cfg), progress=stop_midway, stop=flag)
    # the shipped full-size SD 1.5 configs do not fit the tiny checkpoint: said before anything is written
    with pytest.raises(InputFileError, match="does not fit the SD 1.x configs"):
        export_merged_checkpoint(str(base), [(tmp_path / "a.safetensors", 1.0)], out, dtype="fp32",
                                 config_dir=str(config_dir(Family.SD1)))
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("family", [Family.SD1, Family.SD2, Family.SDXL], ids=lambda f: f.value)
def test_streamed_export_of_a_file_without_configs_derives_them_from_its_shapes(family, tmp_path, monkeypatch):
    import lora_studio.export.checkpoint as export

    _, cfg, base, _ = _inputs(family, tmp_path)  # written without lora_studio.configs
    monkeypatch.setattr(export, "_load_base", lambda *a: pytest.fail("the streamed path loaded the pipeline"))
    loras = [(tmp_path / "a.safetensors", 0.8)]
    export.export_merged_checkpoint(str(base), loras, tmp_path / "derived.safetensors", dtype="fp32")
    export.export_merged_checkpoint(str(base), loras, tmp_path / "given.safetensors", dtype="fp32",
                                    config_dir=str(cfg))
    derived, given = _tensors(tmp_path / "derived.safetensors"), _tensors(tmp_path / "given.safetensors")
    assert derived.keys() == given.keys()
    assert all(torch.equal(derived[k], given[k]) for k in given)


def test_streamed_export_refuses_an_incomplete_checkpoint(tmp_path):
    from lora_studio.export import export_merged_checkpoint
    from lora_studio.fileio import load_safetensors, save_safetensors_atomic

    _, cfg, base, _ = _inputs(Family.SD1, tmp_path)
    sd, meta = load_safetensors(base)
    save_safetensors_atomic({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, base, meta)
    with pytest.raises(InputFileError, match="incomplete"):
        export_merged_checkpoint(str(base), [(tmp_path / "a.safetensors", 1.0)], tmp_path / "o.safetensors",
                                 config_dir=str(cfg))
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("family", [Family.SD1, Family.SD2, Family.SDXL], ids=lambda f: f.value)
def test_ldm_location_agrees_with_the_whole_state_dict_rename(family):
    """Every weight of every part, located name by name, is the tensor pipeline_to_ldm_state_dict puts there."""
    from lora_studio.ldm import pipeline_to_ldm_state_dict
    from lora_studio.ldm.locate import ldm_location

    pipe = tiny_pipeline(family)
    sd = pipeline_to_ldm_state_dict(pipe, family)
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
             "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    checked = fused = 0
    for comp, model in parts.items():
        if model is None:
            continue
        for name, param in model.state_dict().items():
            loc = ldm_location(family, comp, name, pipe.unet.config, len(pipe.vae.decoder.up_blocks))
            if loc is None:
                assert name in ("text_projection.weight", "embeddings.position_ids",
                                "text_model.embeddings.position_ids"), (comp, name)
                continue
            got = sd[loc.key]
            if loc.part is not None:
                rows = param.shape[0]
                got = got[loc.part * rows:(loc.part + 1) * rows]
                fused += 1
            assert torch.equal(got.reshape(param.shape), param), (comp, name, loc)
            checked += 1
    assert checked > 100
    assert (fused > 0) == (family is not Family.SD1)


def test_a_target_the_stream_cannot_place_falls_back_to_the_in_memory_export(tmp_path, monkeypatch):
    """SDXL's OpenCLIP text_projection is stored transposed, so a LoRA on it has no plain place in the file: the
    export loads the model instead (and says so), and the result is the merge all the same."""
    import lora_studio.export.checkpoint as export

    pipe, cfg, base, mods = _inputs(Family.SDXL, tmp_path)
    w = pipe.text_encoder_2.text_projection.weight
    kname = kohya_module_name(TE2_PREFIX, "text_projection")
    mods[kname] = LoraModule.from_updown(kname, torch.randn(2, w.shape[1]) * 0.3, torch.randn(w.shape[0], 2) * 0.3, 1.0)
    save_kohya_lora(mods, tmp_path / "a.safetensors")
    calls, events = [], []
    real_load = export._load_base
    monkeypatch.setattr(export, "_load_base", lambda *a: calls.append(a) or real_load(*a))
    res = export.export_merged_checkpoint(str(base), [(tmp_path / "a.safetensors", 1.0)], tmp_path / "o.safetensors",
                                          dtype="fp32", config_dir=str(cfg), progress=events.append)
    assert len(calls) == 1 and res.modules_changed == len(mods)
    assert any("cannot stream" in e.message for e in events)
    live = tiny_pipeline(Family.SDXL)
    reference_merge(live, [(mods, 1.0)])
    back = load_single_file(Family.SDXL, res.out, cfg)
    assert torch.allclose(back.text_encoder_2.text_projection.weight, live.text_encoder_2.text_projection.weight,
                          atol=1e-6)
    assert not torch.allclose(live.text_encoder_2.text_projection.weight, w, atol=1e-3)


def test_streamed_export_of_a_live_mix_keeps_its_strengths_and_block_weights(tmp_path):
    """The GUI exports the Mix tab's mixer with the base's path: the streamed file equals the in-memory export
    of the same live mix (text-encoder strength and block weights included), and the live pipeline is untouched."""
    from lora_studio.export import export_merged_checkpoint
    from lora_studio.mix import LoraMixer
    from lora_studio.models import load_pipeline

    _, cfg, base, _ = _inputs(Family.SD1, tmp_path)
    make_lora(tiny_pipeline(Family.SD1), tmp_path / "b.safetensors", seed=2)
    loaded = load_pipeline(str(base), config_dir=cfg)
    mixer = LoraMixer(loaded.pipe)
    mixer.add(tmp_path / "a.safetensors", strength=0.9, te_strength=0.2, block_weights={"up": 0.0})
    mixer.add(tmp_path / "b.safetensors", strength=0.4)
    mixer.apply()
    live = unet_out(loaded.pipe)
    streamed = export_merged_checkpoint(str(base), mixer, tmp_path / "s.safetensors", dtype="fp32",
                                        config_dir=str(cfg))
    assert torch.equal(unet_out(loaded.pipe), live)
    in_memory = export_merged_checkpoint(None, mixer, tmp_path / "m.safetensors", dtype="fp32")
    got, want = _tensors(streamed.out), _tensors(in_memory.out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    rec = json.loads(read_safetensors_header(streamed.out)[1]["lora_studio.merged_loras"])
    assert rec[0]["te_strength"] == 0.2 and rec[0]["block_weights"] == {"up": 0.0}
    back = load_single_file(Family.SD1, streamed.out, cfg)
    assert torch.allclose(unet_out(back), live, atol=1e-5)


def test_a_bf16_base_streams_to_fp32_and_fp16_like_the_in_memory_export(tmp_path):
    """Base files come in bf16 too: each tensor is read as bf16, merged in fp32 and written in the asked dtype."""
    from lora_studio.export import export_merged_checkpoint
    from lora_studio.fileio import load_safetensors, save_safetensors_atomic
    from lora_studio.models import load_pipeline

    _, cfg, base, _ = _inputs(Family.SD1, tmp_path)
    sd, meta = load_safetensors(base)
    save_safetensors_atomic({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()},
                            base, meta)
    loras = [(tmp_path / "a.safetensors", 0.7)]
    for dtype in ("fp32", "fp16"):
        streamed = export_merged_checkpoint(str(base), loras, tmp_path / f"s-{dtype}.safetensors", dtype=dtype,
                                            config_dir=str(cfg))
        loaded = load_pipeline(str(base), config_dir=cfg)  # from_single_file upcasts the bf16 tensors to fp32
        in_memory = export_merged_checkpoint(loaded, loras, tmp_path / f"m-{dtype}.safetensors", dtype=dtype)
        got, want = _tensors(streamed.out), _tensors(in_memory.out)
        assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want), dtype


@pytest.mark.parametrize("family", [Family.SD1, Family.SD2, Family.SDXL], ids=lambda f: f.value)
def test_a_diffusers_folder_base_streams_like_the_in_memory_export(family, tmp_path, monkeypatch):
    """A diffusers folder exported to one file: renamed and merged tensor by tensor, equal to the in-memory export
    (which loads the folder and renames the whole pipeline), with the folder's weights sharded or not."""
    import lora_studio.export.checkpoint as export
    from lora_studio.models import load_pipeline

    pipe = tiny_pipeline(family)
    folder = tmp_path / "base"
    pipe.save_pretrained(folder, safe_serialization=True,
                         **({"max_shard_size": "200KB"} if family is Family.SD1 else {}))
    if family is Family.SD1:
        assert list((folder / "unet").glob("*.index.json"))  # sharded: read through the index
    mods = make_lora(pipe, tmp_path / "a.safetensors", seed=1)
    loras = [(tmp_path / "a.safetensors", 0.8)]
    calls = []
    real_load = export._load_base
    monkeypatch.setattr(export, "_load_base", lambda *a: calls.append(a) or real_load(*a))
    streamed = export.export_merged_checkpoint(str(folder), loras, tmp_path / "s.safetensors", dtype="fp16")
    assert calls == [] and streamed.modules_changed == len(mods)
    in_memory = export.export_merged_checkpoint(load_pipeline(str(folder)), loras, tmp_path / "m.safetensors",
                                                dtype="fp16")
    got, want = _tensors(streamed.out), _tensors(in_memory.out)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k

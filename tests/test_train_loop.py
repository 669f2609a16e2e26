"""The training loop's mechanics on the demo architecture (random weights, a few steps): outputs, kohya file
loaded by diffusers, stop + resume equal to an uninterrupted run, non-finite loss, out of memory, precision knobs."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
import torch

import lora_studio.train.trainer as trainer_mod
from train_configs import tiny_config
from lora_studio.demo import make_demo_dataset, random_demo_pipeline
from lora_studio.errors import TrainingError
from lora_studio.fileio import load_safetensors
from lora_studio.lora.keys import kohya_module_name
from lora_studio.progress import StopFlag
from lora_studio.train.config import TrainConfig
from lora_studio.train.trainer import TrainCallbacks, train
from train_threads import one_torch_thread  # noqa: F401  (autouse: one torch thread)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("tiny-data"), count=4, repeats=2)


def _cfg(data, out, **kw) -> TrainConfig:
    return tiny_config(data, out, **{"alpha": 4.0, "seed": 3, **kw})


def _merge_by_hand(pipe, tensors: dict) -> None:
    """W <- W + alpha/rank * up @ down for every module of a kohya file (the formula in DESIGN.md)."""
    names = {kohya_module_name("lora_unet_", n): m for n, m in pipe.unet.named_modules()}
    names.update({kohya_module_name("lora_te_", n): m for n, m in pipe.text_encoder.named_modules()})
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert downs
    for key in downs:
        base = key[: -len(".lora_down.weight")]
        down, up, alpha = tensors[key], tensors[base + ".lora_up.weight"], tensors[base + ".alpha"]
        with torch.no_grad():
            names[base].weight += (alpha / down.shape[0]) * (up @ down)


def test_outputs_and_diffusers_loads_the_kohya_file(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path, train_text_encoder=True, text_encoder_lr=5e-3, steps=2,
               sample_every_n_steps=2, sample_prompts=["a red circle"], sample_steps=2)
    pipe = random_demo_pipeline()
    before = {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder")
              for k, v in getattr(pipe, c).state_dict().items()}
    res = train(cfg, pipeline=pipe)
    after = {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)

    run = tmp_path / "run"
    assert res.lora_path == run / "run.safetensors" and res.steps_done == 2 and not res.stopped
    assert 0 < res.trainable_params and 0 < res.trainable_percent < 10
    assert json.loads((run / "config.json").read_text())["train_text_encoder"] is True
    rows = list(csv.DictReader((run / "loss.csv").open()))
    assert [float(r["loss"]) for r in rows] == pytest.approx(res.losses, rel=1e-5)
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert res.samples == [run / "samples" / "step-000002.png"] and res.samples[0].exists()

    tensors, meta = load_safetensors(res.lora_path)
    te_key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    unet_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    for key in (te_key, unet_key):
        assert tensors[f"{key}.lora_down.weight"].shape[0] == 2
        assert float(tensors[f"{key}.alpha"]) == 4.0
    assert meta["ss_network_dim"] == "2" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_num_train_images"] == "8"
    captions = [p.read_text() for p in sorted((tiny_data / "2_stripes").glob("*.txt"))]
    assert json.loads(meta["ss_tag_frequency"]) == {"2_stripes": dict(Counter(captions))}

    ours, theirs = random_demo_pipeline(), random_demo_pipeline()
    _merge_by_hand(ours, tensors)
    theirs.load_lora_weights(str(res.lora_path))
    ids = ours.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([300])
    with torch.no_grad():
        te_ours, te_theirs = ours.text_encoder(ids)[0], theirs.text_encoder(ids)[0]
        base_te = random_demo_pipeline().text_encoder(ids)[0]
        torch.testing.assert_close(te_theirs, te_ours, rtol=1e-4, atol=1e-5)
        assert (te_ours - base_te).abs().max() > 1e-4                        # the TE LoRA does something
        torch.testing.assert_close(theirs.unet(x, t, encoder_hidden_states=te_ours).sample,
                                   ours.unet(x, t, encoder_hidden_states=te_ours).sample, rtol=1e-4, atol=1e-5)


def test_stop_then_resume_equals_an_uninterrupted_run(tiny_data, tmp_path):
    knobs = dict(steps=4, lr_scheduler="cosine", lr_warmup_steps=1, shuffle_tags=True, caption_dropout_rate=0.3,
                 lora_dropout=0.1, noise_offset=0.05, min_snr_gamma=5.0)
    full = train(_cfg(tiny_data, tmp_path, run_name="full", **knobs), pipeline=random_demo_pipeline())

    stop = StopFlag()
    cb = TrainCallbacks(on_step=lambda step, loss: stop.request() if step == 2 else None)
    cfg = _cfg(tiny_data, tmp_path, run_name="parts", **knobs)
    first = train(cfg, stop=stop, callbacks=cb, pipeline=random_demo_pipeline())
    assert first.stopped and first.steps_done == 2
    assert first.lora_path.name == "parts-step000002.safetensors" and first.lora_path.exists()
    assert (tmp_path / "parts" / "state" / "latest.json").exists()
    second = train(cfg.replace(resume=True), pipeline=random_demo_pipeline())
    assert second.steps_done == 4 and not second.stopped
    assert second.losses == pytest.approx(full.losses, rel=1e-6)

    a, _ = load_safetensors(full.lora_path)
    b, _ = load_safetensors(second.lora_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-8), k
    changed = load_safetensors(first.lora_path)[0]
    assert any(not torch.equal(changed[k], a[k]) for k in a)               # the steps after the stop mattered

    with pytest.raises(TrainingError, match="rank = 2.*rank = 3"):
        train(cfg.replace(resume=True, rank=3), pipeline=random_demo_pipeline())
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(cfg.replace(resume=str(tmp_path / "nowhere")), pipeline=random_demo_pipeline())


def test_non_finite_loss_stops_and_keeps_the_last_good_save(tiny_data, tmp_path, monkeypatch):
    real, calls = trainer_mod.diffusion_loss, []

    def poisoned(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(trainer_mod, "diffusion_loss", poisoned)
    pipe = random_demo_pipeline()
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(TrainingError, match=r"nan at step 3.*run-step000002\.safetensors.*learning rate"):
        train(_cfg(tiny_data, tmp_path, steps=5, save_every_n_steps=1), pipeline=pipe)
    saved, _ = load_safetensors(tmp_path / "run" / "run-step000002.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (tmp_path / "run" / "run.safetensors").exists()
    assert all(torch.equal(weights[k], v) for k, v in pipe.unet.state_dict().items())  # base left clean


def test_out_of_memory_becomes_advice(tiny_data, tmp_path, monkeypatch):
    def oom(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainer_mod, "diffusion_loss", oom)
    with pytest.raises(TrainingError, match="batch_size 2.*gradient_checkpointing"):
        train(_cfg(tiny_data, tmp_path), pipeline=random_demo_pipeline())


def test_checkpointing_changes_nothing_and_bf16_accumulation_vpred_run(tiny_data, tmp_path):
    plain = train(_cfg(tiny_data, tmp_path, run_name="plain", steps=2), pipeline=random_demo_pipeline())
    ckpt = train(_cfg(tiny_data, tmp_path, run_name="ckpt", steps=2, gradient_checkpointing=True),
                 pipeline=random_demo_pipeline())
    a, b = load_safetensors(plain.lora_path)[0], load_safetensors(ckpt.lora_path)[0]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)

    pipe = random_demo_pipeline()
    res = train(_cfg(tiny_data, tmp_path, run_name="mixed", steps=2, batch_size=1, gradient_accumulation_steps=2,
                     mixed_precision="bf16", prediction_type="v_prediction", min_snr_gamma=5.0,
                     gradient_checkpointing=True), pipeline=pipe)
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    meta = load_safetensors(res.lora_path)[1]
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_mixed_precision"] == "bf16"
    assert "forward" not in pipe.unet.__dict__ and not pipe.unet.is_gradient_checkpointing  # pipeline left as it was


def test_save_cadence_callbacks_and_progress(tmp_path):
    data = make_demo_dataset(tmp_path / "data", count=2, repeats=1)   # batch 2 -> one batch per epoch
    events, saves, steps = [], [], []
    cb = TrainCallbacks(on_step=lambda s, loss: steps.append(s), on_save=lambda s, p: saves.append((s, p.name)))
    res = train(_cfg(data, tmp_path, steps=4, save_every_n_epochs=2, save_every_n_steps=3, save_state_every_n_steps=1),
                progress=events.append, callbacks=cb, pipeline=random_demo_pipeline())
    assert steps == [1, 2, 3, 4]
    assert saves == [(2, "run-step000002.safetensors"), (3, "run-step000003.safetensors"), (4, "run.safetensors")]
    assert sorted(p.name for p in (tmp_path / "run" / "state").iterdir()) == ["latest.json", "step-000003"]
    first = next(e for e in events if "trainable_params" in e.metrics)
    assert first.metrics["trainable_params"] == res.trainable_params and "% of" in first.message
    train_events = [e for e in events if e.stage == "train" and "loss" in e.metrics]
    assert [e.current for e in train_events] == [1, 2, 3, 4] and all(e.total == 4 for e in train_events)
    assert load_safetensors(res.lora_path)[1]["ss_epoch"] == "4"


@pytest.mark.parametrize("name, module, cls", [("adamw8bit", "bitsandbytes", "AdamW8bit"),
                                               ("prodigy", "prodigyopt", "Prodigy")])
def test_optional_optimizers_are_used_when_installed_else_named(name, module, cls):
    import importlib.util

    from lora_studio.errors import ConfigError

    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}]
    cfg = TrainConfig(optimizer=name)
    if importlib.util.find_spec(module) is None:
        with pytest.raises(ConfigError, match=f"pip install {module}.*'adamw'"):
            trainer_mod._make_optimizer(cfg, groups)
    else:
        assert type(trainer_mod._make_optimizer(cfg, groups)).__name__ == cls
    assert isinstance(trainer_mod._make_optimizer(TrainConfig(), groups), torch.optim.AdamW)


def test_own_pipeline_in_bf16_trains_fp32_lora_weights(tiny_data, tmp_path, monkeypatch):
    base = tmp_path / "base"
    random_demo_pipeline().save_pretrained(base)
    loaded = []
    real = trainer_mod.load_base
    monkeypatch.setattr(trainer_mod, "load_base", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    res = train(_cfg(tiny_data, tmp_path, base=str(base), steps=2, mixed_precision="bf16", train_text_encoder=True,
                     sample_every_n_steps=2, sample_prompts=["a red circle"], sample_steps=2))
    assert all(torch.isfinite(torch.tensor(res.losses))) and res.samples[0].exists()
    tensors, _ = load_safetensors(res.lora_path)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert any(t.abs().max() > 0 for t in ups)       # fp32 LoRA weights moved (bf16 would round tiny updates away)
    pipe = loaded[0].pipe         # the frozen weights were held in bf16 (SD1's VAE too, as in diffusers' script)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.bfloat16


def test_lora_metadata_hashes_trigger_and_base_name(tiny_data, tmp_path):
    import hashlib
    import struct

    cfg = _cfg(tiny_data, tmp_path, steps=1, trigger_word="stripy",
               base=str(tmp_path / "private" / "folders" / "my-base.safetensors"))
    res = train(cfg, pipeline=random_demo_pipeline())
    _, meta = load_safetensors(res.lora_path)
    raw = res.lora_path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data_hash = hashlib.sha256(raw[8 + n:]).hexdigest()          # A1111's addnet hash, computed independently
    assert meta["sshs_model_hash"] == data_hash
    assert meta["modelspec.hash_sha256"] == "0x" + data_hash
    assert meta["ss_sd_model_name"] == "my-base.safetensors"
    assert "private" not in json.dumps(meta)
    assert meta["modelspec.trigger_phrase"] == "stripy"
    assert meta["modelspec.prediction_type"] == "epsilon"

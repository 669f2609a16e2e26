"""The trainer's speed and memory switches, checked on the CPU: frozen weights in the mixed-precision dtype with fp32
LoRA weights (and a passed-in pipeline put back exactly), text states encoded before the first step, the VAE and
text encoders offloaded once cached, channels-last, fused AdamW and torch.compile only where they apply (CUDA),
and the CLI flags for each."""

from __future__ import annotations

import warnings

import pytest
import torch

import lora_studio.train.trainer as trainer_mod
from train_configs import tiny_config
from lora_studio.cli.main import build_parser
from lora_studio.cli.train import build_config
from lora_studio.demo import make_demo_dataset, random_demo_pipeline
from lora_studio.errors import ConfigError
from lora_studio.train.config import TrainConfig, load_preset
from lora_studio.train.placement import Offloader, Placement, frozen_dtypes, wants_channels_last
from lora_studio.train.trainer import TrainCallbacks, train
from train_threads import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from bench.unet_steps import lora_unet, unet_step


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("switch-data"), count=4, repeats=1)  # 4 distinct captions


def _cfg(data, out, **kw) -> TrainConfig:
    return tiny_config(data, out, **{"steps": 2, "batch_size": 1, "seed": 5, **kw})


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


# ----------------------------------------------------------------------------- frozen weights in bf16
def test_bf16_run_holds_frozen_weights_in_bf16_trains_fp32_lora_and_gives_the_pipeline_back(data, tmp_path):
    pipe = random_demo_pipeline()
    before = {f"{c}.{k}": v.clone() for c in ("unet", "vae", "text_encoder")
              for k, v in getattr(pipe, c).state_dict().items()}
    conv_in = pipe.unet.conv_in.weight                # the same Parameter object must come back
    seen = []

    def look(step, loss):
        lora = _lora_params(pipe.unet)
        seen.append(dict(unet=pipe.unet.conv_in.weight.dtype, vae=pipe.vae.encoder.conv_in.weight.dtype,
                         te=pipe.text_encoder.dtype, lora={p.dtype for p in lora.values()},
                         moved=max(float(p.detach().abs().max()) for n, p in lora.items() if "lora_B" in n)))

    res = train(_cfg(data, tmp_path, mixed_precision="bf16", train_text_encoder=True, text_encoder_lr=1e-2),
                pipeline=pipe, callbacks=TrainCallbacks(on_step=look))
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert [s["unet"] for s in seen] == [torch.bfloat16] * 2
    assert {s["vae"] for s in seen} == {torch.bfloat16} and {s["te"] for s in seen} == {torch.bfloat16}
    assert all(s["lora"] == {torch.float32} for s in seen)
    assert seen[-1]["moved"] > 0                       # the optimizer updated the fp32 LoRA weights (B starts at 0)
    # the caller's pipeline: fp32 again, bit for bit, same Parameter objects, no LoRA left
    after = {f"{c}.{k}": v for c in ("unet", "vae", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    assert after.keys() == before.keys()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    assert pipe.unet.conv_in.weight is conv_in and not _lora_params(pipe.unet)


def test_a_pipeline_handed_over_keeps_no_originals_and_stays_cast(data, tmp_path, monkeypatch):
    """give_back=False: no second copy of the weights is kept during the run (Placement keeps nothing), the
    frozen weights stay bf16 afterwards, and the LoRA layers are still taken out."""
    import lora_studio.train.trainer as trainer

    kept = []
    real = trainer.Placement

    class Watched(real):
        def place(self, module, dtype, channels_last=False):
            super().place(module, dtype, channels_last)
            kept.append(len(self._originals))

    monkeypatch.setattr(trainer, "Placement", Watched)
    pipe = random_demo_pipeline()
    res = train(_cfg(data, tmp_path, mixed_precision="bf16", steps=1), pipeline=pipe, give_back=False)
    assert res.losses and kept and max(kept) == 0
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16 and not _lora_params(pipe.unet)
    kept.clear()
    train(_cfg(data, tmp_path / "again", mixed_precision="bf16", steps=1), pipeline=random_demo_pipeline())
    assert max(kept) > 0  # given back (the default): the originals are kept


def test_cast_frozen_weights_off_keeps_fp32_frozen_weights(data, tmp_path):
    pipe = random_demo_pipeline()
    dtypes = []
    train(_cfg(data, tmp_path, mixed_precision="bf16", cast_frozen_weights=False, steps=1), pipeline=pipe,
          callbacks=TrainCallbacks(on_step=lambda s, l: dtypes.append((pipe.unet.conv_in.weight.dtype,
                                                                      pipe.vae.dtype, pipe.text_encoder.dtype))))
    assert dtypes == [(torch.float32, torch.float32, torch.float32)]


def test_frozen_dtypes_keep_the_sdxl_vae_fp32_under_fp16_only():
    unet, vae, te = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert frozen_dtypes("bf16", True, unet, vae, [te], sdxl=False) == {unet: torch.bfloat16, vae: torch.bfloat16,
                                                                        te: torch.bfloat16}
    assert frozen_dtypes("fp16", True, unet, vae, [te], sdxl=True)[vae] == torch.float32
    assert frozen_dtypes("fp16", True, unet, vae, [te], sdxl=True)[unet] == torch.float16
    assert frozen_dtypes("bf16", True, unet, vae, [te], sdxl=True)[vae] == torch.bfloat16
    assert set(frozen_dtypes("no", True, unet, vae, [te], sdxl=False).values()) == {None}
    assert set(frozen_dtypes("bf16", False, unet, vae, [te], sdxl=False).values()) == {None}


# ----------------------------------------------------------------------------- text states before step 1
def _count_te_calls(pipe) -> list[int]:
    calls = [0]
    pipe.text_encoder.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_every_caption_is_encoded_before_the_first_step(data, tmp_path):
    pipe = random_demo_pipeline()
    calls = _count_te_calls(pipe)
    per_step = []
    res = train(_cfg(data, tmp_path, steps=4), pipeline=pipe,         # batch 1: each step a caption not seen yet
                callbacks=TrainCallbacks(on_step=lambda s, l: per_step.append(calls[0])))
    assert len(res.losses) == 4
    assert per_step == [1, 1, 1, 1]                    # one batched call for the 4 captions, none in the steps


def test_shuffled_tags_still_encode_in_the_steps(data, tmp_path):
    pipe = random_demo_pipeline()
    calls = _count_te_calls(pipe)
    per_step = []
    train(_cfg(data, tmp_path, steps=3, shuffle_tags=True), pipeline=pipe,
          callbacks=TrainCallbacks(on_step=lambda s, l: per_step.append(calls[0])))
    assert per_step[0] >= 1 and per_step[-1] > per_step[0]


def test_caption_dropout_gets_the_empty_caption_cached_too(data, tmp_path):
    pipe = random_demo_pipeline()
    calls = _count_te_calls(pipe)
    per_step = []
    train(_cfg(data, tmp_path, steps=4, caption_dropout_rate=0.5), pipeline=pipe,
          callbacks=TrainCallbacks(on_step=lambda s, l: per_step.append(calls[0])))
    assert per_step == [1, 1, 1, 1]


# ----------------------------------------------------------------------------- offloading after caching
class _RecordingOffloader(Offloader):
    """Active on the CPU too (the moves are to the same device there), recording what the trainer offloads."""

    last: "_RecordingOffloader | None" = None

    def __init__(self, device, enabled):
        super().__init__(device, enabled)
        self.active, self.offloaded, self.visits = bool(enabled), [], 0
        _RecordingOffloader.last = self

    def offload(self, models):
        moved = super().offload(models)
        self.offloaded.extend(moved)
        return moved

    def on_device(self):
        self.visits += 1
        return super().on_device()


@pytest.mark.parametrize("changes, expected", [
    ({}, ("vae", "text_encoder")),
    ({"train_text_encoder": True}, ("vae",)),
    ({"shuffle_tags": True}, ("vae",)),
    ({"cache_latents": "none"}, ("text_encoder",)),
    ({"cache_text_embeddings": False}, ("vae",)),
    ({"offload_cached_models": False}, ()),
])
def test_models_whose_outputs_are_cached_are_offloaded(data, tmp_path, monkeypatch, changes, expected):
    monkeypatch.setattr(trainer_mod, "Offloader", _RecordingOffloader)
    pipe = random_demo_pipeline()
    train(_cfg(data, tmp_path, steps=1, sample_every_n_steps=1, sample_prompts=["a red circle"], sample_steps=1,
               **changes), pipeline=pipe)
    rec = _RecordingOffloader.last
    assert tuple(n for n in ("vae", "text_encoder") if getattr(pipe, n) in rec.offloaded) == expected
    assert len(rec.offloaded) == len(expected) and rec.visits == 1   # back on the device for the samples
    assert rec.models == []                                           # and back for good at the end


def test_offloader_moves_to_the_cpu_and_back_only_on_cuda():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moves = []

        def to(self, *args, **kwargs):
            self.moves.append(str(args[0]))
            return self

    assert not Offloader(torch.device("cpu"), True).active        # nowhere to move to on a CPU
    m = Recorder()
    off = Offloader(torch.device("cuda"), True)
    assert off.offload([m, None]) == [m] and m.moves == ["cpu"]
    with off.on_device():
        assert m.moves == ["cpu", "cuda"]
    assert m.moves == ["cpu", "cuda", "cpu"]
    off.restore()
    assert m.moves == ["cpu", "cuda", "cpu", "cuda"] and off.models == []
    assert Offloader(torch.device("cuda"), False).offload([Recorder()]) == []


# ----------------------------------------------------------------------------- channels-last
def test_channels_last_is_for_cuda_and_placement_puts_the_format_back():
    assert wants_channels_last(True, "cuda") and not wants_channels_last(True, "cpu")
    assert not wants_channels_last(False, "cuda")
    unet = random_demo_pipeline().unet
    w = unet.conv_in.weight
    values = w.detach().clone()
    place = Placement(torch.device("cpu"), keep_originals=True)
    place.place(unet, None, channels_last=True)
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    place.restore()
    assert unet.conv_in.weight is w and w.is_contiguous() and torch.equal(w, values)


# ----------------------------------------------------------------------------- fused AdamW
def _groups():
    return [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.1}]


def test_fused_adamw_on_cuda_unless_turned_off():
    fused = trainer_mod._make_optimizer(TrainConfig(), _groups(), "cuda")
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults.get("fused") is True
    assert not trainer_mod._make_optimizer(TrainConfig(), _groups(), "cpu").defaults.get("fused")
    assert not trainer_mod._make_optimizer(TrainConfig(fused_optimizer=False), _groups(), "cuda").defaults.get("fused")


def test_fused_adamw_falls_back_with_a_warning(monkeypatch):
    real = torch.optim.AdamW

    class NoFused(real):
        def __init__(self, params, fused=None, **kw):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                                   "devices")
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    with pytest.warns(UserWarning, match="fused AdamW is not available"):
        opt = trainer_mod._make_optimizer(TrainConfig(), _groups(), "cuda")
    assert isinstance(opt, NoFused) and not opt.defaults.get("fused")


# ----------------------------------------------------------------------------- torch.compile
def test_compile_only_on_cuda(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append((m, kw)) or ("compiled", m))
    m = torch.nn.Linear(1, 1)
    assert trainer_mod._maybe_compile(m, False, "cuda") is m and compiled == []
    assert trainer_mod._maybe_compile(m, True, "cuda") == ("compiled", m) and compiled == [(m, {"mode": None})]
    with pytest.warns(UserWarning, match="compile_unet is on but training runs on the CPU"):
        assert trainer_mod._maybe_compile(m, True, "cpu", "reduce-overhead") is m
    assert len(compiled) == 1
    trainer_mod._maybe_compile(m, True, "cuda", "reduce-overhead")
    assert compiled[-1] == (m, {"mode": "reduce-overhead"})


def test_only_cuda_graph_modes_mark_each_step():
    assert trainer_mod._uses_cuda_graphs(True, "reduce-overhead") and trainer_mod._uses_cuda_graphs(True, "max-autotune")
    assert not trainer_mod._uses_cuda_graphs(True, "default")
    assert not trainer_mod._uses_cuda_graphs(True, "max-autotune-no-cudagraphs")
    assert not trainer_mod._uses_cuda_graphs(False, "reduce-overhead")  # not compiled (e.g. on a CPU): nothing to mark


def test_compile_mode_comes_from_the_cli_and_bad_modes_are_refused():
    def build(*argv):
        return build_config(build_parser().parse_args(["train", *argv]))

    assert TrainConfig().compile_mode == "default"
    assert build("--compile", "--compile-mode", "reduce-overhead").compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile_mode = 'fast' is not one of default, reduce-overhead"):
        TrainConfig(compile_mode="fast").validate()


def test_compile_flag_on_the_cpu_trains_without_compiling_and_says_so(data, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train(_cfg(data, tmp_path, steps=1, compile_unet=True), pipeline=random_demo_pipeline())
    assert len(res.losses) == 1 and compiled == []
    assert any("compile_unet" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- config, presets, CLI
def test_switch_defaults_are_safe_for_a_cpu_and_the_cli_sets_each():
    cfg = TrainConfig()
    assert (cfg.cast_frozen_weights, cfg.channels_last, cfg.fused_optimizer, cfg.offload_cached_models) == (True,) * 4
    assert cfg.compile_unet is False and cfg.mixed_precision == "no" and cfg.lean_backward is False

    def build(*argv):
        return build_config(build_parser().parse_args(["train", *argv]))

    off = build("--no-cast-frozen-weights", "--no-channels-last", "--no-fused-optimizer", "--compile",
                "--no-offload-cached-models", "--gradient-checkpointing")
    assert (off.cast_frozen_weights, off.channels_last, off.fused_optimizer, off.offload_cached_models) == (False,) * 4
    assert off.compile_unet and off.gradient_checkpointing
    assert build("--no-lean-backward").lean_backward is False and build("--lean-backward").lean_backward is True
    assert build("--preset", "style-sd15").compile_unet is False            # preset values stay unless a flag is given
    assert build("--preset", "style-sd15", "--compile").compile_unet is True
    for name in ("style-sd15", "style-sdxl"):
        preset = load_preset(name)
        assert preset.cast_frozen_weights and preset.channels_last and preset.fused_optimizer
        assert preset.offload_cached_models and preset.compile_mode == "default"
    # lean_backward is the low-memory switch: on in the SDXL preset only (it costs eager speed)
    assert load_preset("style-sdxl").lean_backward and not load_preset("style-sd15").lean_backward


# ----------------------------------------------------------------------------- peft's input casts under autocast
def _unet_step(dtype, skip: bool, **lora):
    """One step of the LoRA'd demo UNet; also counts the casts (``aten::_to_copy``) it made."""
    unet, inj, skipped = lora_unet(dtype, skip_casts=skip, **lora)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, grads = unet_step(unet, dtype)
    copies = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
    return out, grads, skipped, len(inj.layers), copies


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skipping_peft_input_casts_changes_no_bit_of_outputs_or_gradients(dtype):
    out0, grads0, _, n, copies0 = _unet_step(dtype, skip=False)
    out1, grads1, skipped, _, copies1 = _unet_step(dtype, skip=True)
    assert skipped == n > 0
    assert copies1 < copies0  # the round trips are gone (to_out.0 gets a half-precision input) ...
    assert torch.equal(out0, out1)  # ... and nothing else changed
    assert len(grads0) == len(grads1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert any(bool(g.abs().max() > 0) for g in grads1[:-1])


@pytest.mark.parametrize("lora", [dict(use_dora=True), dict(lora_dropout=0.1)])
def test_dora_and_dropout_layers_keep_peft_input_casts(lora):
    *_, skipped, n, _ = _unet_step(torch.bfloat16, skip=True, **lora)
    assert n > 0 and skipped == 0


@pytest.mark.parametrize("precision, skips", [("bf16", True), ("no", False)])
def test_mixed_precision_runs_skip_the_input_casts(data, tmp_path, precision, skips):
    from peft.tuners.lora import LoraLayer

    pipe = random_demo_pipeline()
    seen = []

    def look(step, loss):
        seen.append({getattr(m, "cast_input_dtype_enabled", True) for m in pipe.unet.modules()
                     if isinstance(m, LoraLayer)})

    res = train(_cfg(data, tmp_path, mixed_precision=precision), pipeline=pipe, callbacks=TrainCallbacks(on_step=look))
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert seen == [{not skips}] * 2

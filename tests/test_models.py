"""Loading base models: single files of every family, diffusers folders, the demo, pickles, bad paths, hub ids."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from tiny_families import tiny_config_dir, tiny_pipeline, write_ldm_checkpoint

from lora_studio.configs import clip_tokenizer, config_dir, family_tokenizers
from lora_studio.errors import InputFileError, UnsafeFileError
from lora_studio.family import Family
from lora_studio.models import LoadedModel, describe_checkpoint, load_pipeline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _assert_same_weights(a, b) -> None:
    for name in COMPONENTS:
        ma = getattr(a, name, None)
        if ma is None:
            assert getattr(b, name, None) is None
            continue
        sa, sb = ma.state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.fixture(scope="module", params=[Family.SD1, Family.SD2, Family.SDXL], ids=lambda f: f.value)
def tiny_file(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(f"models-{family.value}")
    pipe = tiny_pipeline(family, seed=3)
    return family, pipe, write_ldm_checkpoint(pipe, folder / "tiny.safetensors"), tiny_config_dir(family, folder / "cfg", pipe)


# --------------------------------------------------------------------------- single files
def test_single_file_loads_back_equal(tiny_file):
    family, pipe, path, cfg = tiny_file
    loaded = load_pipeline(path, config_dir=cfg)
    assert isinstance(loaded, LoadedModel)
    assert (loaded.family, loaded.kind, loaded.source) == (family, "single_file", str(path))
    assert type(loaded.pipe) is type(pipe)
    _assert_same_weights(pipe, loaded.pipe)
    assert loaded.pipe.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    # same text conditioning, through the loaded tokenizer and encoder
    ids = loaded.pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids)[0], loaded.pipe.text_encoder(ids)[0])


def test_single_file_in_half_precision(tiny_file):
    family, pipe, path, cfg = tiny_file
    loaded = load_pipeline(path, config_dir=cfg, dtype=torch.float16)
    assert loaded.pipe.unet.dtype == torch.float16
    w = next(iter(pipe.unet.parameters()))
    assert torch.equal(next(iter(loaded.pipe.unet.parameters())), w.half())


def test_describe_checkpoint_reads_only_the_header(tiny_file, monkeypatch):
    family, pipe, path, _ = tiny_file
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("tensors were read"))
    info = describe_checkpoint(path)
    params = sum(p.numel() for n in COMPONENTS if getattr(pipe, n, None) is not None for p in getattr(pipe, n).parameters())
    assert info["family"] is family and info["family_error"] is None and info["kind"] == "single_file"
    assert info["size_bytes"] == path.stat().st_size and info["dtype"] == "F32"
    # every parameter, plus the few constants of the layout (position ids, logit scale)
    assert params <= info["parameters"] <= params + 2 * 77 + 1
    assert info["components"]["model.diffusion_model"] == len(pipe.unet.state_dict())


def test_metadata_prediction_type_is_honoured(tmp_path):
    pipe = tiny_pipeline(Family.SD2)
    path = write_ldm_checkpoint(pipe, tmp_path / "eps.safetensors", {"modelspec.prediction_type": "epsilon"})
    loaded = load_pipeline(path, config_dir=tiny_config_dir(Family.SD2, tmp_path / "cfg", pipe))
    assert loaded.pipe.scheduler.config.prediction_type == "epsilon"
    assert describe_checkpoint(path)["metadata"]["modelspec.prediction_type"] == "epsilon"


def test_file_that_does_not_match_the_shipped_config_loads_from_its_shapes(tiny_file):
    family, pipe, path, _ = tiny_file
    loaded = load_pipeline(path)  # toy widths, no carried configs: derived from the shapes (test_derived_configs.py)
    assert loaded.family is family
    assert list(loaded.pipe.unet.config.block_out_channels) == list(pipe.unet.config.block_out_channels)


# --------------------------------------------------------------------------- shipped configs and tokenizer
@pytest.mark.parametrize("family, unet_params", [
    (Family.SD1, 859_520_964), (Family.SD2, 865_910_724), (Family.SDXL, 2_567_463_684)])
def test_shipped_configs_build_the_published_models(family, unet_params):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = config_dir(family)
    index = json.loads((folder / "model_index.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == unet_params
    assert count(vae) == 83_653_863
    assert count(te) == {Family.SD1: 123_060_480, Family.SD2: 340_387_840, Family.SDXL: 123_060_480}[family]
    assert unet.config.cross_attention_dim == family.context_dim
    if family is Family.SDXL:
        with init_empty_weights():
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
        assert count(te2) == 694_659_840
        assert index["_class_name"] == "StableDiffusionXLPipeline"
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched.get("prediction_type", "epsilon") == ("v_prediction" if family is Family.SD2 else "epsilon")


def test_clip_tokenizer_matches_clip_ids():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407
    sdxl = family_tokenizers(Family.SDXL)
    assert sdxl["tokenizer_2"].pad_token_id == 0 and sdxl["tokenizer_2"].pad_token == "!"
    padded = family_tokenizers(Family.SD2)["tokenizer"]("a cat", padding="max_length", max_length=6).input_ids
    assert padded == [49406, 320, 2368, 49407, 0, 0]


# --------------------------------------------------------------------------- diffusers folders and the demo
def test_diffusers_folder(tmp_path):
    pipe = tiny_pipeline(Family.SDXL, seed=5)
    pipe.save_pretrained(tmp_path / "xl")
    events = []
    loaded = load_pipeline(tmp_path / "xl", progress=events.append)
    assert (loaded.family, loaded.kind) == (Family.SDXL, "diffusers")
    assert [(e.stage, e.current, e.total) for e in events] == [("load", 0, 1), ("load", 1, 1)]
    assert "SDXL" in events[-1].message
    _assert_same_weights(pipe, loaded.pipe)
    info = describe_checkpoint(tmp_path / "xl")
    assert (info["kind"], info["family"], info["dtype"]) == ("diffusers", Family.SDXL, "F32")
    assert info["parameters"] == sum(p.numel() for n in COMPONENTS for p in getattr(pipe, n).parameters())
    assert info["components"]["text_encoder_2"] == "CLIPTextModelWithProjection"


def test_demo_model(demo_model_dir):
    for source in ("demo", None):
        loaded = load_pipeline(source)
        assert (loaded.family, loaded.kind, loaded.source) == (Family.SD1, "diffusers", "demo")
    from_folder = load_pipeline(demo_model_dir)
    assert from_folder.source == str(demo_model_dir)
    _assert_same_weights(loaded.pipe, from_folder.pipe)


def test_unsupported_diffusers_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(InputFileError, match="FluxPipeline"):
        load_pipeline(tmp_path)


# --------------------------------------------------------------------------- pickles
class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _malicious_ckpt(path: Path, marker: Path) -> Path:
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"model.diffusion_model.x": _Payload(marker)}}, fh)
    return path


def test_pickle_refused_by_default_and_never_executed(tmp_path):
    marker = tmp_path / "pwned.txt"
    ckpt = _malicious_ckpt(tmp_path / "model.ckpt", marker)
    with pytest.raises(UnsafeFileError, match="allow-pickle"):
        load_pipeline(ckpt)
    with pytest.raises(UnsafeFileError, match="weights_only"):
        load_pipeline(ckpt, allow_pickle=True)
    assert not marker.exists()
    for suffix in (".pt", ".bin", ".pth"):
        with pytest.raises(UnsafeFileError):
            load_pipeline(ckpt.rename(ckpt.with_suffix(suffix)))
        ckpt = ckpt.with_suffix(suffix)
    assert not marker.exists()
    with open(ckpt, "rb") as fh:  # the file really is hostile: plain unpickling runs its code
        pickle.load(fh)
    assert marker.read_text() == "code ran"


def test_pickle_allowed_loads_weights_only(tmp_path):
    pipe = tiny_pipeline(Family.SD1, seed=7)
    from lora_studio.ldm import pipeline_to_ldm_state_dict

    sd = {k: v.clone() for k, v in pipeline_to_ldm_state_dict(pipe).items()}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, ckpt)
    loaded = load_pipeline(ckpt, allow_pickle=True, config_dir=tiny_config_dir(Family.SD1, tmp_path / "cfg", pipe))
    assert (loaded.family, loaded.kind) == (Family.SD1, "single_file")
    _assert_same_weights(pipe, loaded.pipe)


def test_pickle_without_a_config_folder_derives_the_configs_from_its_shapes(tmp_path):
    pipe = tiny_pipeline(Family.SD2, seed=7)
    from lora_studio.ldm import pipeline_to_ldm_state_dict

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: v.clone() for k, v in pipeline_to_ldm_state_dict(pipe).items()}}, ckpt)
    loaded = load_pipeline(ckpt, allow_pickle=True)
    assert (loaded.family, loaded.kind) == (Family.SD2, "single_file")
    _assert_same_weights(pipe, loaded.pipe)


# --------------------------------------------------------------------------- user mistakes
@pytest.mark.parametrize("name, content, needle", [
    ("missing.safetensors", None, "does not exist"),
    ("", None, "model_index.json"),
    ("empty.safetensors", b"", "too short"),
    ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", "not JSON"),
    ("model.onnx", b"x", "onnx"),
])
def test_bad_paths_are_clear_errors(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputFileError, match=needle):
        load_pipeline(path)


def test_truncated_checkpoint(tiny_file, tmp_path):
    _, _, path, cfg = tiny_file
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputFileError, match="truncated|outside"):
        load_pipeline(cut, config_dir=cfg)


def test_lora_file_given_as_base_model(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
              str(tmp_path / "style.safetensors"))
    with pytest.raises(InputFileError, match="LoRA"):
        load_pipeline(tmp_path / "style.safetensors")
    assert describe_checkpoint(tmp_path / "style.safetensors")["family"] is None


def test_real_lora_given_as_base_model(real_loras):
    lora = real_loras / "lora_disney.safetensors"
    with pytest.raises(InputFileError, match="LoRA"):
        load_pipeline(lora)
    info = describe_checkpoint(lora)
    assert info["family"] is None and "LoRA" in info["family_error"] and info["tensors"] > 0


def test_hub_id_offline_says_what_to_do():
    with pytest.raises(InputFileError) as err:
        load_pipeline("someone/not-a-real-model-xyz")
    msg = str(err.value)
    assert "someone/not-a-real-model-xyz" in msg and "cache" in msg and "download" in msg.lower()

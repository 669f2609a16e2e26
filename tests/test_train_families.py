"""Training on SD 2.x (v-prediction, 1024-wide context) and SDXL (two text encoders, size conditioning) bases:
the written kohya file names every module as the family's readers expect and diffusers applies it exactly as
W0 + alpha/r * up @ down."""

from __future__ import annotations

import pytest
import torch

from train_configs import tiny_config
from lora_studio.demo import make_demo_dataset
from lora_studio.fileio import load_safetensors
from lora_studio.mix import LoraMixer
from lora_studio.lora.keys import UnetLayout, kohya_module_name
from lora_studio.train.conditioning import sdxl_time_ids
from lora_studio.train.dataset import ImageItem
from lora_studio.train.trainer import train
from tiny_families import tiny_pipeline
from train_threads import one_torch_thread  # noqa: F401  (autouse: one torch thread)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("fam-data"), count=2, repeats=1)


def _merge_by_hand(pipe, tensors, prefixes):
    names = {}
    sdxl = "text_encoder_2" in prefixes.values()
    for prefix, module in prefixes.items():
        model = getattr(pipe, module)
        layout = UnetLayout.from_config(model.config) if sdxl and module == "unet" else None  # kohya's SDXL names
        names.update({kohya_module_name(prefix, n, layout): m for n, m in model.named_modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))})
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    unknown = [k for k in downs if k[: -len(".lora_down.weight")] not in names]
    assert downs and not unknown, unknown[:3]
    for key in downs:
        base = key[: -len(".lora_down.weight")]
        down, up, alpha = tensors[key], tensors[base + ".lora_up.weight"], tensors[base + ".alpha"]
        with torch.no_grad():
            names[base].weight += (alpha / down.shape[0]) * (up @ down)


@pytest.mark.parametrize("family, prefixes, version", [
    ("sd2", {"lora_unet_": "unet", "lora_te_": "text_encoder"}, "sd_v2"),
    ("sdxl", {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}, "sdxl_base_v1-0"),
])
def test_family_training_writes_a_file_diffusers_applies_exactly(data, tmp_path, family, prefixes, version):
    cfg = tiny_config(data, tmp_path, run_name=family, steps=2, text_encoder_lr=1e-2, train_text_encoder=True)
    pipe = tiny_pipeline(family)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    res = train(cfg, pipeline=pipe)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    tensors, meta = load_safetensors(res.lora_path)
    assert meta["ss_base_model_version"] == version
    assert {k.split("_")[1] for k in tensors} == {p.split("_")[1] for p in prefixes}   # unet, te / te1, te2
    if family == "sd2":
        assert meta["modelspec.prediction_type"] == "v"     # the base scheduler's v_prediction, as modelspec spells it

    ours, theirs = tiny_pipeline(family), tiny_pipeline(family)
    _merge_by_hand(ours, tensors, prefixes)
    theirs.load_lora_weights(str(res.lora_path))
    ids = ours.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for module in prefixes.values():
            if module != "unet":
                a = getattr(ours, module)(ids, output_hidden_states=True).hidden_states[-2]
                b = getattr(theirs, module)(ids, output_hidden_states=True).hidden_states[-2]
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        ctx = torch.randn(1, 77, ours.unet.config.cross_attention_dim)
        extra = {}
        if family == "sdxl":
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32),
                                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
        x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
        expected = ours.unet(x, t, encoder_hidden_states=ctx, **extra).sample
        torch.testing.assert_close(theirs.unet(x, t, encoder_hidden_states=ctx, **extra).sample, expected,
                                   rtol=1e-4, atol=1e-5)
        mixed = tiny_pipeline(family)                                           # LoRA Studio's own reader/mixer
        mixer = LoraMixer(mixed)
        name = mixer.add(res.lora_path)
        assert mixer.entries[0].unmatched == [] and mixer.entries[0].matched == len(
            [k for k in tensors if k.endswith(".lora_down.weight")]), name
        mixer.apply()
        torch.testing.assert_close(mixed.unet(x, t, encoder_hidden_states=ctx, **extra).sample, expected,
                                   rtol=1e-4, atol=1e-5)


SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2"]


def test_sdxl_file_uses_kohya_names_and_diffusers_loads_every_module(data, tmp_path):
    """An SDXL LoRA over every target kind is written in kohya's original-layout UNet names, and diffusers'
    own ``load_lora_weights`` + ``fuse_lora`` changes every weight exactly as LoRA Studio's mixer does (in the
    diffusers spelling diffusers merged add_embedding.linear_1 and _2 into one name and dropped both)."""
    cfg = tiny_config(data, tmp_path, run_name="sdxl-all", steps=2, target_modules=SDXL_TARGETS)
    res = train(cfg, pipeline=tiny_pipeline("sdxl"))
    tensors, _ = load_safetensors(res.lora_path)
    names = {k.split(".")[0] for k in tensors}
    assert names and all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                                       "lora_unet_time_embed_", "lora_unet_label_emb_")) for n in names), sorted(names)
    assert {"lora_unet_time_embed_0", "lora_unet_time_embed_2", "lora_unet_label_emb_0_0",
            "lora_unet_label_emb_0_2", "lora_unet_input_blocks_1_0_in_layers_2",
            "lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_2"} <= names

    base = tiny_pipeline("sdxl")
    w0 = {n: m.weight.detach().clone() for n, m in base.unet.named_modules()
          if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    mixed = tiny_pipeline("sdxl")
    mixer = LoraMixer(mixed)
    mixer.add(res.lora_path)
    assert mixer.entries[0].unmatched == [] and mixer.entries[0].matched == len(names)
    mixer.apply()
    ours = {n: m.weight.detach() for n, m in mixed.unet.named_modules() if n in w0}
    changed = {n for n in w0 if not torch.equal(ours[n], w0[n])}
    assert len(changed) == len(names)

    theirs = tiny_pipeline("sdxl")
    theirs.load_lora_weights(str(res.lora_path), adapter_name="t")
    theirs.fuse_lora()
    theirs.unload_lora_weights()
    for n in w0:
        got = theirs.unet.get_submodule(n).weight.detach()
        torch.testing.assert_close(got, ours[n], rtol=1e-5, atol=1e-6, msg=f"{n}: diffusers differs")


def test_sdxl_time_ids_follow_diffusers_order():
    from pathlib import Path

    item = ImageItem(Path("x.png"), "", 1, "c", size=(200, 100), bucket=(96, 40))
    # cover size for a 96x40 bucket keeps 2:1 -> 96x48; centre crop takes 4 rows off the top
    assert sdxl_time_ids([item]).tolist() == [[100.0, 200.0, 4.0, 0.0, 40.0, 96.0]]

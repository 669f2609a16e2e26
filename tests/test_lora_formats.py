"""read_lora on every layout tests/lora_factories.py writes: kind, rank, alpha, and the delta against the
reference formula recomputed here from the raw file tensors; malformed files give errors naming keys."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_factories as F
from lora_studio.errors import FamilyMismatchError, LoraFormatError
from lora_studio.family import Family
from lora_studio.lora.formats import read_lora
from lora_studio.lora.keys import match_modules
from lora_studio.lora.math import module_delta


@pytest.fixture(scope="module")
def pipe():
    return F.demo_or_random_pipeline()


def weight_of(pipe, name: str) -> torch.Tensor:
    result = match_modules(type("L", (), {"modules": {name: None}})(), pipe, check_shapes=False)
    comp, module = result.matched[name]
    return getattr(pipe, comp).get_submodule(module).weight.detach()


def reference(sd: dict, name: str, w0: torch.Tensor) -> torch.Tensor:
    """The DESIGN.md formulas, written out from the raw tensors (float64)."""
    t = {k[len(name) + 1:]: v.double() for k, v in sd.items() if k.startswith(name + ".")}
    alpha = float(t["alpha"]) if "alpha" in t else None
    shape = w0.shape
    if "lora_down.weight" in t:
        r = t["lora_down.weight"].shape[0]
        d = (t["lora_up.weight"].reshape(shape[0], r) @ t["lora_down.weight"].reshape(r, -1)).reshape(shape)
        d = d * ((alpha if alpha is not None else r) / r)
        if "dora_scale" in t:
            m, w = t["dora_scale"], w0.double() + d
            if m.shape[0] == shape[0]:  # per output row
                norm = torch.linalg.norm(w.reshape(shape[0], -1), dim=1).reshape(m.shape)
            else:  # per input column
                norm = torch.linalg.norm(w.transpose(0, 1).reshape(shape[1], -1), dim=1).reshape(m.shape)
            d = m * w / norm - w0.double()
        return d
    if "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (alpha / r)
        return d.reshape(shape)
    if "diff" in t:
        return t["diff"]
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    d = torch.kron(w1, w2).reshape(shape)
    factored = "lokr_w1_b" in t or "lokr_w2_b" in t
    r = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else (t["lokr_w2_b"].shape[0] if factored else 1)
    return d * (alpha / r if factored and alpha is not None else 1.0)


CASES = [  # (id, writer, kwargs, kind, rank, alpha)
    ("lora-alpha", F.write_kohya_lora, dict(rank=4, alpha=2.0), "lora", 4, 2.0),
    ("lora-no-alpha", F.write_kohya_lora, dict(rank=3, alpha=None), "lora", 3, None),
    ("lora-te-v5-spelling", F.write_kohya_lora, dict(rank=2, te_spelling="plain"), "lora", 2, 2.0),
    ("locon", F.write_kohya_lora, dict(rank=4, alpha=1.0, conv=True), "locon", 4, 1.0),
    ("locon-no-alpha", F.write_kohya_lora, dict(rank=2, alpha=None, conv=True), "locon", 2, None),
    ("loha", F.write_loha, dict(rank=4, alpha=2.0), "loha", 4, 2.0),
    ("loha-conv", F.write_loha, dict(rank=2, alpha=1.0, conv=True), "loha", 2, 1.0),
    ("lokr-full", F.write_lokr, dict(variant="full", alpha=4.0), "lokr", 0, 4.0),
    ("lokr-full-conv", F.write_lokr, dict(variant="full", conv=True), "lokr", 0, 1.0),
    ("lokr-factored", F.write_lokr, dict(variant="factored", rank=2, alpha=1.0), "lokr", 2, 1.0),
    ("lokr-factored-conv", F.write_lokr, dict(variant="factored", rank=2, alpha=3.0, conv=True), "lokr", 2, 3.0),
    ("lokr-w2-factored", F.write_lokr, dict(variant="w2_factored", rank=2, alpha=1.0, conv=True), "lokr", 2, 1.0),
    ("dora-in", F.write_dora, dict(direction="in"), "lora", 4, 2.0),
    ("dora-out-conv", F.write_dora, dict(direction="out", conv=True), "lora", 4, 2.0),
    ("full", F.write_kind, dict(kind="full", alpha=None), "full", 0, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_kohya_layout_reads_back_with_the_reference_delta(tmp_path, pipe, case):
    _, writer, kwargs, kind, rank, alpha = case
    path = writer(tmp_path / "x.safetensors", pipe, **kwargs)
    lf = read_lora(path)
    sd = load_file(str(path))
    assert lf.format == "kohya" and len(lf.modules) == len({k.split(".")[0] for k in sd})
    assert match_modules(lf, pipe).unmatched == []
    assert lf.family is Family.SD1  # toy shapes do not tell; the metadata does
    for name, mod in lf.modules.items():
        expected_kind = kind if kind not in ("lora", "locon") else (
            "locon" if sd[f"{name}.lora_down.weight"].dim() == 4 else "lora")
        assert (mod.kind, mod.rank, mod.alpha) == (expected_kind, rank, alpha), name
        w0 = weight_of(pipe, name)
        got = module_delta(mod, tuple(w0.shape), base=w0)
        assert got.dtype == torch.float32 and got.shape == w0.shape
        torch.testing.assert_close(got.double(), reference(sd, name, w0), atol=1e-5, rtol=1e-4)
    if "dora" in case[0]:
        assert "DoRA" in lf.kinds


@pytest.mark.parametrize("old_names", [False, True])
def test_peft_layout_maps_to_kohya_names(tmp_path, pipe, old_names):
    path = F.write_peft_lora(tmp_path / "p.safetensors", pipe, rank=4, alpha=8.0, old_names=old_names)
    lf = read_lora(path)
    sd = load_file(str(path))
    assert lf.format == "peft" and match_modules(lf, pipe).unmatched == []
    a, b = ("lora.down.weight", "lora.up.weight") if old_names else ("lora_A.weight", "lora_B.weight")
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    mod = lf.modules["lora_unet_" + module.replace(".", "_")]
    assert (mod.rank, mod.alpha) == (4, 8.0)
    want = sd[f"unet.{module}.{b}"] @ sd[f"unet.{module}.{a}"] * 2.0
    torch.testing.assert_close(module_delta(mod, tuple(want.shape)), want)
    te = lf.modules["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    torch.testing.assert_close(module_delta(te, (32, 32)), sd[f"text_encoder.encoder.layers.0.self_attn.q_proj.{b}"]
                               @ sd[f"text_encoder.encoder.layers.0.self_attn.q_proj.{a}"] * 2.0)


def test_peft_without_alpha_means_scale_one(tmp_path, pipe):
    lf = read_lora(F.write_peft_lora(tmp_path / "p.safetensors", pipe, rank=4, alpha=None))
    assert all(m.alpha is None and m.scale == 1.0 for m in lf.modules.values())


def test_sdxl_layout_is_sdxl(tmp_path):
    lf = read_lora(F.write_sdxl_lora(tmp_path / "xl.safetensors"))
    assert lf.family is Family.SDXL
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"} <= set(lf.modules)


def _corrupt(tmp_path, pipe, edit) -> str:
    sd = load_file(str(F.write_kohya_lora(tmp_path / "ok.safetensors", pipe)))
    edit(sd)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    return str(tmp_path / "bad.safetensors")


NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_missing_up_names_the_key(tmp_path, pipe):
    path = _corrupt(tmp_path, pipe, lambda sd: sd.pop(f"{NAME}.lora_up.weight"))
    with pytest.raises(LoraFormatError, match=f"{NAME}.lora_down.weight.*lora_up.weight"):
        read_lora(path)


def test_rank_zero_is_refused(tmp_path, pipe):
    def edit(sd):
        sd[f"{NAME}.lora_down.weight"] = torch.zeros(0, 32)
        sd[f"{NAME}.lora_up.weight"] = torch.zeros(32, 0)
    with pytest.raises(LoraFormatError, match=f"{NAME}.*rank 0"):
        read_lora(_corrupt(tmp_path, pipe, edit))


def test_nan_weights_are_refused(tmp_path, pipe):
    def edit(sd):
        sd[f"{NAME}.lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(LoraFormatError, match=f"non-finite.*{NAME}.lora_up.weight"):
        read_lora(_corrupt(tmp_path, pipe, edit))


def test_unknown_scheme_names_keys(tmp_path):
    save_file({"model.layer.weight": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(LoraFormatError, match="model.layer.weight"):
        read_lora(tmp_path / "w.safetensors")


def test_unknown_suffix_and_unsupported_kind_name_keys(tmp_path, pipe):
    path = _corrupt(tmp_path, pipe, lambda sd: sd.update({f"{NAME}.oft_blocks": torch.zeros(2, 4, 4)}))
    with pytest.raises(LoraFormatError, match=f"OFT.*{NAME}.oft_blocks"):
        read_lora(path)
    path = _corrupt(tmp_path, pipe, lambda sd: sd.update({f"{NAME}.weird": torch.zeros(2)}))
    with pytest.raises(LoraFormatError, match=f"{NAME}.weird"):
        read_lora(path)


def test_pickle_is_refused_and_foreign_architecture_named(tmp_path):
    from lora_studio.errors import UnsafeFileError

    (tmp_path / "x.ckpt").write_bytes(b"not read")
    with pytest.raises(UnsafeFileError):
        read_lora(tmp_path / "x.ckpt")
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(4, 2)},
              str(tmp_path / "flux.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(FamilyMismatchError, match="FLUX.*claims SD 1.x"):
        read_lora(tmp_path / "flux.safetensors")


def test_shapes_win_over_metadata(tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 1024), f"{name}.lora_up.weight": torch.zeros(320, 2)},
              str(tmp_path / "sd2.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    lf = read_lora(tmp_path / "sd2.safetensors")
    assert lf.family is Family.SD2 and "metadata claims SD 1.x" in lf.notes[0]


LDM_UNETS = {
    "sd1-like": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl-like": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=48,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8),
}


@pytest.mark.parametrize("kind", sorted(LDM_UNETS))
def test_ldm_names_agree_with_diffusers_checkpoint_converter(kind):
    """Every UNet parameter renamed to original (ldm) names by keys.diffusers_unet_to_ldm, then converted back by
    diffusers' own single-file converter, lands on the same parameter (kohya SDXL LoRAs use these names)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from lora_studio.lora.keys import UnetLayout, diffusers_unet_to_ldm

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, attention_head_dim=4,
                                norm_num_groups=8, **LDM_UNETS[kind])
    layout = UnetLayout.from_config(unet.config)
    sd = unet.state_dict()
    ldm = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        new = diffusers_unet_to_ldm(module, layout)
        assert new is not None, key
        ldm[f"model.diffusion_model.{new}.{param}"] = value
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd)
    for key in sd:
        assert torch.equal(back[key].reshape(sd[key].shape), sd[key]), key


def test_bundled_embeddings_are_kept_and_reported(tmp_path, pipe):
    from lora_studio.mix import LoraMixer

    path = _corrupt(tmp_path, pipe, lambda sd: sd.update({"bundle_emb.sks.string_to_param.*": torch.ones(2, 32)}))
    lf = read_lora(path)
    assert list(lf.embeddings) == ["sks.string_to_param.*"] and len(lf.modules) > 0
    mixer = LoraMixer(copy.deepcopy(pipe))
    with pytest.raises(LoraFormatError, match="token embeddings"):
        mixer.add(lf)
    mixer.add(lf, allow_partial=True)
    assert mixer.entries[0].unmatched == ["<embedding sks.string_to_param.*>"]


FLOAT_FACTORS = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn]
GOOD_ALPHAS = {"0-d float": torch.tensor(4.0), "(1,) float": torch.tensor([4.0]), "(1, 1) fp16": torch.ones(1, 1) * 4,
               "0-d int64": torch.tensor(4)}
BAD_ALPHAS = {"vector": (torch.tensor([4.0, 1.0]), "2 values of float32 [4.0, 1.0]"),
              "bool": (torch.tensor(True), "1 value of bool [True]"),
              "complex": (torch.tensor(4 + 0j, dtype=torch.complex64), "1 value of complex64")}


def test_factor_dtypes_and_alpha_forms_the_reader_takes_and_refuses(tmp_path):
    """Factors of every floating dtype read; integer, bool and complex factors are refused with the key named.
    An alpha is one real number in any shape with one element; a vector, a bool or a complex is refused."""
    import bad_inputs as B

    base = B.lora_pair()
    down_key, alpha_key = f"{B.MODULE}.lora_down.weight", f"{B.MODULE}.alpha"
    for dtype in FLOAT_FACTORS:
        mod = read_lora(B.lora_file(tmp_path, "f.safetensors", {**base, down_key: base[down_key].to(dtype)})
                        ).modules[B.MODULE]
        assert mod.tensors["lora_down.weight"].dtype == dtype
    for dtype in (torch.int8, torch.int64, torch.uint8, torch.bool, torch.complex64):
        with pytest.raises(LoraFormatError, match=f"{down_key} is {str(dtype)[6:]}, but LoRA weights are floating"):
            read_lora(B.lora_file(tmp_path, "f.safetensors", {**base, down_key: base[down_key].to(dtype)}))
    for name, alpha in GOOD_ALPHAS.items():
        assert read_lora(B.lora_file(tmp_path, "a.safetensors", {**base, alpha_key: alpha})
                         ).modules[B.MODULE].alpha == 4.0, name
    for name, (alpha, shown) in BAD_ALPHAS.items():
        with pytest.raises(LoraFormatError) as info:
            read_lora(B.lora_file(tmp_path, "a.safetensors", {**base, alpha_key: alpha}))
        assert f"{alpha_key} holds {shown}" in str(info.value) and "one finite number" in str(info.value), name


@pytest.mark.parametrize("cfg, field", [
    ({"unet.lora_alpha": "8"}, "unet.lora_alpha"),
    ({"unet.lora_alpha": True}, "unet.lora_alpha"),
    ({"unet.alpha_pattern": {"(": 2}}, "unet.alpha_pattern"),
    ({"unet.alpha_pattern": ["to_q"]}, "unet.alpha_pattern"),
    ({"unet.alpha_pattern": {"to_q": None}}, 'unet.alpha_pattern["to_q"]'),
])
def test_peft_alpha_metadata_that_is_not_a_number_is_refused_with_the_field_named(tmp_path, pipe, cfg, field):
    import json

    path = F.write_peft_lora(tmp_path / "p.safetensors", pipe, alpha=None, te=False)
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(cfg)})
    with pytest.raises(LoraFormatError, match=f"field {__import__('re').escape(field)} is .*download"):
        read_lora(path)
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps({"unet.alpha_pattern": {"to_q": 2},
                                                                                "unet.lora_alpha": 8})})
    alphas = {n.endswith("to_q"): m.alpha for n, m in read_lora(path).modules.items()}
    assert alphas == {True: 2.0, False: 8.0}

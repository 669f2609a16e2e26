"""LoRA extraction from two models, the spectrum plot, and resize/merge of LoRA files (kohya format)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lora_studio.demo import random_demo_pipeline
from lora_studio.errors import ConfigError, ExportError


def _perturb(pipe, suffix: str, rank: int, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Add a known rank-``rank`` delta to every UNet layer whose name ends with ``suffix``; return the deltas."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, mod in pipe.unet.named_modules():
            if name.endswith(suffix):
                out, inn = mod.weight.shape[0], mod.weight[0].numel()
                d = (torch.randn(out, rank, generator=g) @ torch.randn(rank, inn, generator=g) * scale)
                d = d.reshape(mod.weight.shape)
                mod.weight += d
                deltas[name] = d
    return deltas


def test_extract_recovers_known_delta_and_diffusers_applies_it(tmp_path):
    from lora_studio.export import extract_lora

    base, tuned = random_demo_pipeline(0), random_demo_pipeline(0)
    deltas = _perturb(tuned, "attn2.to_k", rank=2, scale=0.05, seed=1)
    out = tmp_path / "extracted.safetensors"
    rep = extract_lora(tuned, base, out, "energy", 0.999, dtype="fp32")
    assert len(rep.stats) == len(deltas) == 7
    assert all(st.new_rank == 2 and st.energy_kept > 0.999 for st in rep.stats)
    assert rep.summary["skipped_unchanged"] > 0  # the untouched projections were not written
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
        assert meta["ss_network_dim"] == "2" and meta["ss_base_model_version"] == "sd_v1"
        assert len([k for k in fh.keys() if k.endswith(".alpha")]) == 7
    # independent check: diffusers' own kohya loader, fused into the base, gives the tuned weights
    base.load_lora_weights(str(out))
    base.fuse_lora()
    for name, d in deltas.items():
        got = base.unet.get_submodule(name).weight
        want = tuned.unet.get_submodule(name).weight
        assert torch.allclose(got, want, atol=1e-5), name


def test_extract_all_layers_includes_convs_and_refuses_identical_models(tmp_path):
    from lora_studio.export import extract_lora

    base, tuned = random_demo_pipeline(0), random_demo_pipeline(0)
    with pytest.raises(ExportError, match="equals the base"):
        extract_lora(tuned, base, tmp_path / "none.safetensors", "fixed", 4)
    assert not (tmp_path / "none.safetensors").exists()
    deltas = _perturb(tuned, "resnets.0.conv1", rank=1, scale=0.02, seed=2)
    with pytest.raises(ExportError):  # attention-only extraction sees no change in resnet convs
        extract_lora(tuned, base, tmp_path / "attn.safetensors", "fixed", 4)
    rep = extract_lora(tuned, base, tmp_path / "all.safetensors", "fixed", 1, targets="all", dtype="fp32")
    assert {st.name for st in rep.stats} == {"lora_unet_" + n.replace(".", "_") for n in deltas}
    with safe_open(str(tmp_path / "all.safetensors"), "pt") as fh:
        name = "lora_unet_down_blocks_0_resnets_0_conv1"
        assert fh.get_tensor(f"{name}.lora_down.weight").shape == (1, 32, 3, 3)
        assert fh.get_tensor(f"{name}.lora_up.weight").shape == (32, 1, 1, 1)
    with pytest.raises(ConfigError, match="'every'"):
        extract_lora(tuned, base, tmp_path / "x.safetensors", "fixed", 1, targets="every")


def test_spectrum_plot_and_summary(tmp_path):
    from PIL import Image

    from lora_studio.spectrum import plot_spectrum

    spectra = {f"lora_unet_m{i}": torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.2]) for i in range(9)}
    spectra["lora_unet_flat"] = torch.ones(16)  # needs rank 15 for 90%
    out = tmp_path / "spectrum.png"
    summary = plot_spectrum(spectra, out, energy=0.9)
    assert summary.per_module["lora_unet_m0"] == 3 and summary.per_module["lora_unet_flat"] == 15
    assert summary.rank_most == 3 and summary.rank_max == 15  # 9 of 10 modules need 3
    assert "rank <= 3" in summary.text() and "90%" in summary.text()
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 800
    # deltas and modules are accepted too
    w = torch.randn(12, 3) @ torch.randn(3, 10)
    assert plot_spectrum({"d": w}, tmp_path / "d.png", energy=1.0).per_module["d"] == 3


# ----------------------------------------------------------------------------- LoRA files: resize and merge
def _kohya_file(pipe, path, seed: int, rank: int, alpha: float, dtype=torch.float32, meta=None, spectrum=None):
    """A kohya LoRA on the demo's attention projections + one resnet conv + a text-encoder projection.
    With ``spectrum``, every linear module's delta (scale included) has exactly those singular values."""
    from lora_studio.lora.formats import LoraModule
    from lora_studio.lora.writer import save_kohya_lora
    from lora_studio.lora.keys import TE_PREFIX, UNET_PREFIX, kohya_module_name

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for prefix, model, suffixes in [(UNET_PREFIX, pipe.unet, ("attn1.to_q", "attn2.to_v", "resnets.0.conv1")),
                                    (TE_PREFIX, pipe.text_encoder, ("self_attn.k_proj",))]:
        for name, mod in model.named_modules():
            if not name.endswith(suffixes):
                continue
            w = mod.weight
            kname = kohya_module_name(prefix, name)
            if spectrum is not None and w.dim() == 2:
                u, _ = torch.linalg.qr(torch.randn(w.shape[0], rank, generator=g))
                v, _ = torch.linalg.qr(torch.randn(w.shape[1], rank, generator=g))
                up, down = u * torch.tensor(spectrum) * (rank / alpha), v.T
            else:
                down = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
                up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.3
            modules[kname] = LoraModule.from_updown(kname, down.contiguous(), up.contiguous(), alpha)
    save_kohya_lora(modules, path, {"ss_network_dim": str(rank), "ss_base_model_version": "sd_v1",
                                    "sshs_model_hash": "stale", "ss_tag_frequency": '{"a": {"b": 1}}', **(meta or {})},
                    dtype)
    return modules


def _delta(mod):
    up, down = mod.tensors["lora_up.weight"].double(), mod.tensors["lora_down.weight"].double()
    alpha = mod.alpha if mod.alpha is not None else down.shape[0]
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * alpha / down.shape[0]


def test_resize_lora_file_keeps_delta_at_full_rank_and_truncates_by_energy(tmp_path):
    from lora_studio.export import resize_lora
    from lora_studio.lora.formats import read_lora

    pipe = random_demo_pipeline(0)
    src = _kohya_file(pipe, tmp_path / "in.safetensors", seed=3, rank=4, alpha=2.0, dtype=torch.float16)
    rep = resize_lora(tmp_path / "in.safetensors", tmp_path / "full.safetensors", "fixed", 4)
    assert len(rep.stats) == len(src) and all(abs(st.energy_kept - 1) < 1e-6 for st in rep.stats)
    out = read_lora(tmp_path / "full.safetensors")
    assert set(out.modules) == set(src)
    for name, mod in out.modules.items():
        assert mod.tensors["lora_down.weight"].dtype == torch.float16  # the input's dtype is kept
        assert mod.scale == pytest.approx(0.5)  # alpha/rank ratio kept
        ref = _delta(src[name]).float()
        assert torch.allclose(_delta(mod).float(), ref, atol=2e-3 * ref.abs().max()), name
    meta = out.metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert "sshs_model_hash" not in meta and meta["ss_tag_frequency"] == '{"a": {"b": 1}}'
    assert json.loads(meta["lora_studio.rank_rule"]) == {"method": "fixed", "value": 4}

    # known spectra: energies 16, 9, 4, 1 of 30 -> p = 0.8 keeps rank 2 on every linear module
    src = _kohya_file(pipe, tmp_path / "sp.safetensors", seed=4, rank=4, alpha=1.0, spectrum=[4.0, 3.0, 2.0, 1.0])
    rep = resize_lora(tmp_path / "sp.safetensors", tmp_path / "sp2.safetensors", "energy", 0.8, dtype="fp32")
    lin = [st for st in rep.stats if "conv" not in st.name]
    assert lin and all(st.new_rank == 2 and st.energy_kept == pytest.approx(25 / 30, rel=1e-4) for st in lin)
    assert rep.summary["new_rank_min"] == 2 and "energy kept" in rep.text()
    resized = read_lora(tmp_path / "sp2.safetensors").modules
    for st in lin:
        err = torch.linalg.norm(_delta(resized[st.name]) - _delta(src[st.name]))
        assert float(err) == pytest.approx(5 ** 0.5, rel=1e-3)  # sqrt(2^2 + 1^2): the dropped tail

    with pytest.raises(ConfigError, match="input file"):
        resize_lora(tmp_path / "sp.safetensors", tmp_path / "sp.safetensors", "fixed", 2)


def test_merged_lora_file_applies_like_both_loras_in_diffusers(tmp_path):
    from lora_studio.export import merge_loras
    from lora_studio.lora.formats import read_lora

    pipe = random_demo_pipeline(0)
    a = _kohya_file(pipe, tmp_path / "a.safetensors", seed=5, rank=2, alpha=1.0)
    b = _kohya_file(pipe, tmp_path / "b.safetensors", seed=6, rank=3, alpha=6.0)
    specs = [(tmp_path / "a.safetensors", 0.8), (tmp_path / "b.safetensors", -0.5)]
    merge_loras(specs, tmp_path / "ab.safetensors", method="concat", dtype="fp32")
    merged = read_lora(tmp_path / "ab.safetensors")
    assert all(m.rank == 5 for m in merged.modules.values())
    sources = json.loads(merged.metadata["lora_studio.merged_from"])
    assert [(s["name"], s["strength"]) for s in sources] == [("a.safetensors", 0.8), ("b.safetensors", -0.5)]
    for name, mod in merged.modules.items():
        assert torch.allclose(_delta(mod), 0.8 * _delta(a[name]) - 0.5 * _delta(b[name]), atol=1e-5)

    # independent: diffusers' kohya loader applies the merged file like the two deltas summed
    ref = random_demo_pipeline(0)
    with torch.no_grad():
        for name, mod in ref.unet.named_modules():
            k = "lora_unet_" + name.replace(".", "_")
            if k in a:
                mod.weight += (0.8 * _delta(a[k]) - 0.5 * _delta(b[k])).float()
    unet_only = {k: v for k, v in merged.modules.items() if k.startswith("lora_unet_")}
    from lora_studio.lora.writer import save_kohya_lora

    save_kohya_lora(unet_only, tmp_path / "ab_unet.safetensors")
    pipe.load_lora_weights(str(tmp_path / "ab_unet.safetensors"))
    pipe.fuse_lora()
    for name, mod in ref.unet.named_modules():
        if "lora_unet_" + name.replace(".", "_") in a:
            assert torch.allclose(pipe.unet.get_submodule(name).weight, mod.weight, atol=1e-5), name

    # SVD merge: exact at the stacked rank, smaller and reported below it
    rep = merge_loras(specs, tmp_path / "svd.safetensors", method="svd", rank_method="fixed", value=5, dtype="fp32")
    for name, mod in read_lora(tmp_path / "svd.safetensors").modules.items():
        assert torch.allclose(_delta(mod), 0.8 * _delta(a[name]) - 0.5 * _delta(b[name]), atol=1e-4)
    rep = merge_loras(specs, tmp_path / "svd2.safetensors", method="svd", rank_method="fixed", value=2)
    assert all(st.new_rank == 2 and st.old_rank == 5 and st.energy_kept < 1 for st in rep.stats)


def test_merge_refuses_loras_of_different_families(tmp_path):
    from lora_studio.errors import LoraFormatError
    from lora_studio.export import merge_loras

    pipe = random_demo_pipeline(0)
    _kohya_file(pipe, tmp_path / "a.safetensors", seed=5, rank=2, alpha=1.0)
    _kohya_file(pipe, tmp_path / "x.safetensors", seed=6, rank=2, alpha=1.0,
                meta={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(LoraFormatError, match="different base models"):
        merge_loras([(tmp_path / "a.safetensors", 1), (tmp_path / "x.safetensors", 1)], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_resize_and_merge_cli(tmp_path, capsys):
    from lora_studio.cli.main import main

    pipe = random_demo_pipeline(0)
    _kohya_file(pipe, tmp_path / "in.safetensors", seed=3, rank=4, alpha=4.0)
    png = tmp_path / "spectrum.png"
    rc = main(["resize", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "r.safetensors"),
               "--energy", "0.9", "--spectrum", str(png)])
    out = capsys.readouterr().out
    assert rc == 0 and png.stat().st_size > 1000
    assert "to keep 90% energy most modules" in out and "energy kept" in out
    rc = main(["export", "--as-lora", "--lora", f"{tmp_path / 'in.safetensors'}:0.5",
               "--lora", str(tmp_path / "r.safetensors"), "--out", str(tmp_path / "m.safetensors")])
    assert rc == 0 and (tmp_path / "m.safetensors").exists()
    assert main(["resize", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "bad.safetensors"),
                 "--energy", "1.5"]) == 2
    assert "1.5" in capsys.readouterr().err


def test_resize_real_lokr_file(real_loras, tmp_path):
    """A real LyCORIS LoKr (350 modules, convs included) resized by energy: every module keeps >= 90% and the
    error of the written delta (checked against lora.math's LoKr formula) is exactly the dropped tail."""
    from lora_studio.export import resize_lora
    from lora_studio.lora import math as lora_math
    from lora_studio.lora.formats import read_lora

    src_path = real_loras / "smart_falcon_4_lokr.safetensors"
    rep = resize_lora(src_path, tmp_path / "falcon.safetensors", "energy", 0.9)
    assert len(rep.stats) == 350 and all(0.9 <= st.energy_kept <= 1 for st in rep.stats)
    assert rep.summary["new_rank_max"] <= 16  # a rank-4 x rank-4 Kronecker product has rank <= 16
    src = read_lora(src_path).modules
    out = read_lora(tmp_path / "falcon.safetensors")
    assert out.metadata["ss_network_module"] == "networks.lora" and "ss_network_args" not in out.metadata
    conv = out.modules["lora_unet_up_blocks_3_resnets_0_conv1"]
    assert conv.tensors["lora_down.weight"].shape[1:] == (960, 3, 3)  # a proper LoCon for A1111/ComfyUI
    stats = {st.name: st for st in rep.stats}
    for name in ("lora_unet_up_blocks_3_resnets_0_conv1", "lora_unet_mid_block_attentions_0_proj_in",
                 "lora_te_text_model_encoder_layers_4_self_attn_k_proj"):
        new = lora_math.raw_delta(out.modules[name]).double().flatten(1)
        ref = lora_math.raw_delta(src[name]).double().flatten(1)
        rel = float(torch.linalg.norm(new - ref) / torch.linalg.norm(ref))
        assert rel == pytest.approx(stats[name].rel_error, abs=2e-3), name  # fp16 storage of the factors


def test_extract_cli_from_two_single_files(tmp_path, capsys):
    from tiny_families import tiny_config_dir, write_ldm_checkpoint

    from lora_studio.cli.main import main
    from lora_studio.lora.formats import read_lora

    base, tuned = random_demo_pipeline(0), random_demo_pipeline(0)
    deltas = _perturb(tuned, "attn1.to_v", rank=3, scale=0.05, seed=7)
    cfg = tiny_config_dir("sd1", tmp_path / "cfg", base)
    write_ldm_checkpoint(base, tmp_path / "base.safetensors")
    write_ldm_checkpoint(tuned, tmp_path / "tuned.safetensors")
    png = tmp_path / "sp.png"
    rc = main(["extract", "--tuned", str(tmp_path / "tuned.safetensors"), "--base", str(tmp_path / "base.safetensors"),
               "--out", str(tmp_path / "x.safetensors"), "--energy", "0.99", "--config-dir", str(cfg),
               "--spectrum", str(png)])
    out = capsys.readouterr().out
    assert rc == 0 and png.exists() and "need rank <= 3" in out
    lf = read_lora(tmp_path / "x.safetensors")
    assert len(lf.modules) == len(deltas) and all(m.rank == 3 for m in lf.modules.values())
    assert lf.modules[next(iter(lf.modules))].tensors["lora_down.weight"].dtype == torch.float16

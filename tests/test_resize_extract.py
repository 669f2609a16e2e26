"""LoRA extraction from two models, the spectrum plot, and resize/merge of LoRA files (kohya format)."""

from __future__ import annotations

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
    from lora_studio.export_lora import extract_lora

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
    from lora_studio.export_lora import extract_lora

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

"""Delta math checked against independent references: peft's own DoRA merge, convolutions run as the
chain of layers a LoCon/Tucker module stands for, and hand-written einsums for the LyCORIS Tucker forms."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as Fn

from lora_studio.errors import LoraFormatError
from lora_studio.fileio import save_safetensors_atomic
from lora_studio.lora.formats import LoraModule, read_lora
from lora_studio.lora.math import delta_shape, module_delta, natural_shape


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_locon_delta_equals_running_the_two_convs():
    down, up = torch.randn(3, 5, 3, 3, generator=g()), torch.randn(7, 3, 1, 1, generator=g(1))
    mod = LoraModule.from_updown("m", down, up, alpha=1.5)
    x = torch.randn(2, 5, 9, 9, generator=g(2))
    chained = Fn.conv2d(Fn.conv2d(x, down, padding=1), up) * (1.5 / 3)
    torch.testing.assert_close(Fn.conv2d(x, module_delta(mod, (7, 5, 3, 3)), padding=1), chained, atol=1e-5, rtol=1e-4)


def test_locon_tucker_mid_equals_three_convs():
    down, mid, up = (torch.randn(3, 5, 1, 1, generator=g()), torch.randn(3, 3, 3, 3, generator=g(1)),
                     torch.randn(7, 3, 1, 1, generator=g(2)))
    mod = LoraModule("m", "locon", {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}, None, 3)
    x = torch.randn(2, 5, 8, 8, generator=g(3))
    chained = Fn.conv2d(Fn.conv2d(Fn.conv2d(x, down), mid, padding=1), up)
    assert natural_shape(mod) == (7, 5, 3, 3)
    torch.testing.assert_close(Fn.conv2d(x, module_delta(mod, (7, 5, 3, 3)), padding=1), chained, atol=1e-5, rtol=1e-4)


def _cp_loops(t, wa, wb):
    """W[p, q, k, l] = sum_ij t[i, j, k, l] * wa[i, p] * wb[j, q], with explicit loops over the core."""
    out = torch.zeros(wa.shape[1], wb.shape[1], *t.shape[2:], dtype=torch.float64)
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            out += wa[i].double()[:, None, None, None] * wb[j].double()[None, :, None, None] * t[i, j].double()
    return out


def test_loha_tucker_and_lokr_tucker():
    r, o, i = 2, 6, 4
    t1, t2 = torch.randn(r, r, 3, 3, generator=g()), torch.randn(r, r, 3, 3, generator=g(1))
    w1a, w1b, w2a, w2b = (torch.randn(r, o, generator=g(2)), torch.randn(r, i, generator=g(3)),
                          torch.randn(r, o, generator=g(4)), torch.randn(r, i, generator=g(5)))
    loha = LoraModule("h", "loha", {"hada_t1": t1, "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_t2": t2,
                                    "hada_w2_a": w2a, "hada_w2_b": w2b}, alpha=1.0, rank=r)
    want = _cp_loops(t1, w1a, w1b) * _cp_loops(t2, w2a, w2b) * 0.5
    torch.testing.assert_close(module_delta(loha, (o, i, 3, 3)).double(), want, atol=1e-5, rtol=1e-4)
    w1 = torch.randn(2, 2, generator=g(6))
    lokr = LoraModule("k", "lokr", {"lokr_w1": w1, "lokr_t2": t2, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, alpha=4.0, rank=r)
    w2 = _cp_loops(t2, w2a, w2b)
    want = torch.zeros(2 * o, 2 * i, 3, 3, dtype=torch.float64)
    for a in range(2):
        for c in range(2):
            want[a * o:(a + 1) * o, c * i:(c + 1) * i] = w1[a, c] * w2
    torch.testing.assert_close(module_delta(lokr, (2 * o, 2 * i, 3, 3)).double(), want * 2.0, atol=1e-5, rtol=1e-4)


def test_lokr_whole_factors_ignore_alpha():
    w1, w2 = torch.randn(2, 3, generator=g()), torch.randn(4, 5, generator=g(1))
    mod = LoraModule("k", "lokr", {"lokr_w1": w1, "lokr_w2": w2}, alpha=7.0, rank=0)
    torch.testing.assert_close(module_delta(mod, (8, 15)), torch.kron(w1, w2))


def test_delta_shape_fits_by_outputs_and_size():
    mod = LoraModule("k", "lokr", {"lokr_w1": torch.zeros(2, 3), "lokr_w2": torch.zeros(4, 15)}, rank=0)
    assert natural_shape(mod) == (8, 45)
    assert delta_shape(mod, (8, 5, 3, 3)) == (8, 5, 3, 3)
    assert delta_shape(mod, (4, 90)) is None and delta_shape(mod, (8, 44)) is None
    with pytest.raises(LoraFormatError, match="does not fit"):
        module_delta(mod, (4, 90))


def test_dora_equals_peft_merge(tmp_path):
    """A peft DoRA adapter (linear and conv), merged by peft, against read_lora + module_delta on its tensors."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(16, 12, bias=False)
    model.conv = torch.nn.Conv2d(6, 8, 3, bias=False)
    w0 = {n: getattr(model, n).weight.detach().clone() for n in ("lin", "conv")}
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["lin", "conv"]), model)
    tensors = {}
    with torch.no_grad():
        for n in ("lin", "conv"):
            layer = getattr(model, n)
            layer.lora_A["default"].weight.normal_(0, 0.3)
            layer.lora_B["default"].weight.normal_(0, 0.3)
            layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.rand_like(
                layer.lora_magnitude_vector["default"].weight))
            tensors[f"unet.{n}.lora_A.weight"] = layer.lora_A["default"].weight.clone()
            tensors[f"unet.{n}.lora_B.weight"] = layer.lora_B["default"].weight.clone()
            tensors[f"unet.{n}.lora_magnitude_vector"] = layer.lora_magnitude_vector["default"].weight.clone()
    save_safetensors_atomic(tensors, tmp_path / "dora.safetensors", {
        "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_dora": True})})
    lf = read_lora(tmp_path / "dora.safetensors")
    for n in ("lin", "conv"):
        layer = getattr(model, n)
        layer.merge()
        merged = layer.get_base_layer().weight.detach()
        mod = lf.modules[f"lora_unet_{n}"]
        ours = w0[n] + module_delta(mod, tuple(w0[n].shape), base=w0[n])
        assert not torch.allclose(merged, w0[n], atol=1e-3)
        torch.testing.assert_close(ours, merged, atol=1e-5, rtol=1e-4)


def test_dora_kohya_direction_follows_the_scale_shape():
    """kohya/A1111 files keep one magnitude per input column ((1, in)); LyCORIS wd_on_out per output ((out, 1))."""
    w0 = torch.randn(5, 5, generator=g())
    down, up = torch.randn(2, 5, generator=g(1)), torch.randn(5, 2, generator=g(2))
    merged = w0 + up @ down
    for m, norm in ((torch.rand(1, 5, generator=g(3)) + 0.5, merged.norm(dim=0, keepdim=True)),
                    (torch.rand(5, 1, generator=g(4)) + 0.5, merged.norm(dim=1, keepdim=True))):
        mod = LoraModule("d", "lora", {"lora_down.weight": down, "lora_up.weight": up, "dora_scale": m}, None, 2)
        torch.testing.assert_close(w0 + module_delta(mod, (5, 5), base=w0), m * merged / norm)


class _DoraTargets(torch.nn.Module):
    """A linear, a square conv (in == out, where peft's (1, out, 1, 1) looks like a per-input scale) and a
    non-square conv."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 12, bias=False)
        self.square = torch.nn.Conv2d(8, 8, 3, bias=False)
        self.wide = torch.nn.Conv2d(6, 10, 3, bias=False)


def _trained_dora(seed=0):
    """The trainer's peft DoRA layers on ``_DoraTargets`` with random factors and magnitudes, and the W0s."""
    from lora_studio.train.adapters import inject_lora
    from lora_studio.train.config import TrainConfig

    torch.manual_seed(seed)
    model = _DoraTargets()
    w0 = {n: getattr(model, n).weight.detach().clone() for n in ("lin", "square", "wide")}
    cfg = TrainConfig(rank=3, alpha=6.0, use_dora=True, target_modules=list(w0))
    inj = inject_lora(model, cfg, list(w0), "lora_unet_")
    with torch.no_grad():
        for layer in inj.layers.values():
            layer.lora_A["default"].weight.normal_(0, 0.3)
            layer.lora_B["default"].weight.normal_(0, 0.3)
            mag = layer.lora_magnitude_vector["default"].weight
            mag.mul_(1 + 0.3 * torch.rand_like(mag))
    return model, inj, w0


@pytest.mark.parametrize("name", ["lin", "square", "wide"])
def test_trained_dora_file_merges_as_peft_does(tmp_path, name):
    """The trainer's DoRA, written as a kohya file and read back, merges (strength 1) to peft's own merge, in
    LyCORIS's (out, 1, ...) layout that ComfyUI reads per output."""
    from lora_studio.lora.writer import save_kohya_lora
    from lora_studio.train.adapters import to_kohya_modules

    model, inj, w0 = _trained_dora()
    save_kohya_lora(to_kohya_modules(inj), tmp_path / "dora.safetensors")
    mod = read_lora(tmp_path / "dora.safetensors").modules[f"lora_unet_{name}"]
    assert tuple(mod.tensors["dora_scale"].shape) == (w0[name].shape[0],) + (1,) * (w0[name].dim() - 1)
    layer = getattr(model, name)
    layer.merge()
    merged = layer.get_base_layer().weight.detach()
    ours = w0[name] + module_delta(mod, tuple(w0[name].shape), base=w0[name])
    assert (merged - w0[name]).abs().max() > 1e-2
    torch.testing.assert_close(ours, merged, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["square", "wide"])
def test_dora_files_in_the_old_trainer_layout_read_per_output(tmp_path, name):
    """Kohya files LoRA Studio's trainer wrote with peft's conv magnitude (1, out, 1, 1) still merge as peft does;
    the same shape in another kohya file is LyCORIS's per-input layout (as ComfyUI reads it)."""
    from lora_studio.lora.writer import save_kohya_lora
    from lora_studio.train.adapters import to_kohya_modules

    model, inj, w0 = _trained_dora(seed=1)
    mods = to_kohya_modules(inj)
    for n, layer in inj.layers.items():
        mods[f"lora_unet_{n}"].tensors["dora_scale"] = layer.lora_magnitude_vector["default"].weight.detach().clone()
    args = json.dumps({"init": "gaussian", "rslora": False, "dora": True, "unet_targets": list(w0)})
    save_kohya_lora(mods, tmp_path / "old.safetensors", {"ss_network_args": args})
    save_kohya_lora(mods, tmp_path / "other.safetensors")
    layer = getattr(model, name)
    layer.merge()
    merged = layer.get_base_layer().weight.detach()
    old = read_lora(tmp_path / "old.safetensors")
    assert any("(1, out, 1, 1)" in n for n in old.notes)
    ours = w0[name] + module_delta(old.modules[f"lora_unet_{name}"], tuple(w0[name].shape), base=w0[name])
    torch.testing.assert_close(ours, merged, atol=1e-5, rtol=1e-4)
    other = read_lora(tmp_path / "other.safetensors").modules[f"lora_unet_{name}"]
    if name == "wide":  # (1, 10, 1, 1) against 6 inputs: refused, not guessed
        with pytest.raises(LoraFormatError, match=r"\(10, 1, \.\.\.\) per output or \(1, 6, \.\.\.\) per input"):
            module_delta(other, tuple(w0[name].shape), base=w0[name])
    else:
        m = other.tensors["dora_scale"]
        full = w0[name] + (other.tensors["lora_up.weight"].flatten(1) @ other.tensors["lora_down.weight"].flatten(1)
                           ).reshape(w0[name].shape) * other.scale
        per_input = m * full / full.transpose(0, 1).reshape(8, -1).norm(dim=1).reshape(1, 8, 1, 1)
        torch.testing.assert_close(w0[name] + module_delta(other, tuple(w0[name].shape), base=w0[name]), per_input,
                                   atol=1e-5, rtol=1e-4)

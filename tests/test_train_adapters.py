"""LoRA layers through peft: inits, scaling, and the kohya export equal the weight change the model really has."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_studio.errors import ConfigError
from lora_studio.train.adapters import ADAPTER, inject_lora, remove_lora, to_kohya_modules
from lora_studio.train.config import TrainConfig
from train_threads import one_torch_thread  # noqa: F401  (autouse: one torch thread)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q = nn.Linear(12, 10)
        self.attn.to_out = nn.ModuleList([nn.Linear(10, 12)])
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x):  # not used
        return x


def _delta(mod) -> torch.Tensor:
    up, down = mod.tensors["lora_up.weight"], mod.tensors["lora_down.weight"]
    return mod.scale * (up.flatten(1) @ down.flatten(1))


def _check_export_matches_model(model, inj, originals):
    mods = to_kohya_modules(inj)
    assert sorted(mods) == sorted(f"lora_x_{n.replace('.', '_')}" for n in inj.layers)
    for name, layer in inj.layers.items():
        effective = layer.get_base_layer().weight + layer.get_delta_weight(ADAPTER)
        mod = mods[f"lora_x_{name.replace('.', '_')}"]
        expected = originals[name] + _delta(mod).reshape(originals[name].shape)
        torch.testing.assert_close(effective, expected, rtol=1e-5, atol=1e-5)
    return mods


def _randomise(inj, gen):
    with torch.no_grad():
        for p in inj.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("init, rslora", [("gaussian", False), ("gaussian", True), ("pissa", False)])
def test_export_equals_effective_change_and_removal_restores_base(init, rslora):
    model = Tiny()
    originals = {n: m.weight.detach().clone() for n, m in
                 [("attn.to_q", model.attn.to_q), ("attn.to_out.0", model.attn.to_out[0]), ("conv", model.conv)]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ["to_q", "to_out.0"] + (["conv"] if init == "gaussian" else [])
    cfg = TrainConfig(rank=3, alpha=6.0, init=init, use_rslora=rslora, target_modules=targets)
    inj = inject_lora(model, cfg, targets, "lora_x_")
    assert sorted(inj.layers) == sorted(n for n in originals if n.split(".")[-1] in ("to_q", "0", "conv")
                                        and (n != "conv" or "conv" in targets))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for layer in inj.layers.values():
        assert layer.scaling[ADAPTER] == pytest.approx(6.0 / (math.sqrt(3) if rslora else 3))
        if init == "gaussian":          # standard init: B = 0, so training starts exactly at the base model
            assert torch.count_nonzero(layer.lora_B[ADAPTER].weight) == 0
    mods = _check_export_matches_model(model, inj, originals)   # at init (PiSSA: the file delta is zero)
    for mod in mods.values():
        assert mod.rank == (6 if init == "pissa" else 3)
        assert _delta(mod).abs().max() < 1e-5
        if rslora:
            assert mod.alpha == pytest.approx(6.0 / math.sqrt(3) * 3)
    _randomise(inj, torch.Generator().manual_seed(1))
    _check_export_matches_model(model, inj, originals)          # after "training"
    remove_lora(inj)
    assert isinstance(model.attn.to_q, nn.Linear) and type(model.attn.to_out[0]) is nn.Linear
    assert not hasattr(model, "peft_config")                     # a later run injects without peft's warning
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_pissa_starts_from_the_principal_singular_vectors():
    model = Tiny()
    w0 = model.attn.to_q.weight.detach().clone()
    cfg = TrainConfig(rank=3, alpha=3.0, init="pissa", target_modules=["to_q"])
    inj = inject_lora(model, cfg, ["to_q"], "lora_x_")
    layer = inj.layers["attn.to_q"]
    principal = layer.get_delta_weight(ADAPTER)
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    best_rank3 = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]                      # Eckart-Young reference
    torch.testing.assert_close(principal, best_rank3, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.get_base_layer().weight + principal, w0, rtol=1e-5, atol=1e-6)


def test_dora_writes_a_magnitude_per_output():
    model = Tiny()
    cfg = TrainConfig(rank=2, alpha=2.0, use_dora=True, target_modules=["to_q"])
    inj = inject_lora(model, cfg, ["to_q"], "lora_x_")
    (mod,) = to_kohya_modules(inj).values()
    assert mod.tensors["dora_scale"].shape == (10, 1)   # LyCORIS's layout (peft's is (10,))
    torch.testing.assert_close(mod.tensors["dora_scale"], model.attn.to_q.base_layer.weight.norm(dim=1, keepdim=True))


def test_unknown_targets_are_a_config_error():
    with pytest.raises(ConfigError, match=r"to_qq.*to_q, to_k"):
        inject_lora(Tiny(), TrainConfig(), ["to_qq"], "lora_unet_")

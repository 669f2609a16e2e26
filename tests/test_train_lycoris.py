"""LoHa / LoKr training (``network``): the written file merges, through the project's mixer, to the weights peft's
own layers give, and its keys and shapes are the ones the ``lycoris-lora`` package writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lora_factories import demo_or_random_pipeline
from lora_studio.errors import ConfigError
from lora_studio.lora.writer import save_kohya_lora
from lora_studio.mix import LoraMixer
from lora_studio.train.adapters import ADAPTER, inject_lora, remove_lora, to_kohya_modules
from lora_studio.train.config import TrainConfig
from train_threads import one_torch_thread  # noqa: F401  (autouse: one torch thread)

UNET_TARGETS = ["to_q", "to_out.0", "conv1"]
# (network, settings): whole and factored LoKr factors, Tucker convs, LyCORIS's factor
CASES = [
    ("loha", dict(rank=4, alpha=2.0)),
    ("loha", dict(rank=2, alpha=4.0, use_tucker=True, conv_rank=3, conv_alpha=1.5)),
    ("lokr", dict(rank=2, alpha=1.0)),                               # w2 factored for the 32/64-wide layers
    ("lokr", dict(rank=64, alpha=16.0)),                             # both factors whole: scale folded into w1
    ("lokr", dict(rank=2, alpha=3.0, decompose_both=True, lokr_factor=4)),
    ("lokr", dict(rank=2, alpha=2.0, use_tucker=True)),
]


def _randomise(inj, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in inj.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("network, settings", CASES, ids=lambda c: str(c))
def test_file_merges_through_the_mixer_like_peft(tmp_path, network, settings):
    pipe = demo_or_random_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = TrainConfig(network=network, target_modules=UNET_TARGETS, **settings)
    inj = inject_lora(pipe.unet, cfg, UNET_TARGETS, "lora_unet_")
    assert inj.layers and any(isinstance(l.get_base_layer(), nn.Conv2d) for l in inj.layers.values())
    if "conv_rank" in settings:                                      # LyCORIS's conv_dim through peft's rank_pattern
        assert {l.r[ADAPTER] for l in inj.layers.values() if isinstance(l.get_base_layer(), nn.Conv2d)} == {3}
    _randomise(inj)
    # peft's own merge of each layer (the reference): base + get_delta_weight
    expected = {f"{n}.weight": (l.get_base_layer().weight + l.get_delta_weight(ADAPTER)).detach().clone()
                for n, l in inj.layers.items()}
    mods = to_kohya_modules(inj)
    assert {m.kind for m in mods.values()} == {network}
    file = tmp_path / f"{network}.safetensors"
    save_kohya_lora(mods, file, {"ss_network_module": "lycoris.kohya"}, dtype=torch.float32)
    remove_lora(inj)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())

    mixer = LoraMixer(pipe)
    mixer.add(file, strength=1.0)
    mixer.apply()
    after = pipe.unet.state_dict()
    for k, v in before.items():
        if k in expected:
            torch.testing.assert_close(after[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
            assert not torch.equal(after[k], v), k
        else:
            assert torch.equal(after[k], v), k


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q = nn.Linear(64, 32)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)


LAYOUT_CASES = [
    ("loha", dict(rank=4, alpha=2.0), {}),
    ("lokr", dict(rank=4, alpha=2.0), {}),
    ("lokr", dict(rank=2, alpha=2.0), {}),
    ("lokr", dict(rank=4, alpha=2.0, decompose_both=True, lokr_factor=4), dict(decompose_both=True, factor=4)),
]


@pytest.mark.parametrize("network, settings, lycoris_args", LAYOUT_CASES, ids=lambda c: str(c))
def test_keys_and_shapes_match_the_lycoris_package(network, settings, lycoris_args):
    lycoris = pytest.importorskip("lycoris", reason="lycoris-lora is not installed (pip install lycoris-lora; "
                                                    "it is in tests/requirements.txt)")
    reference = Tiny()
    net = lycoris.create_lycoris(reference, 1.0, linear_dim=settings["rank"], linear_alpha=settings["alpha"],
                                 conv_dim=settings["rank"], conv_alpha=settings["alpha"], algo=network,
                                 **lycoris_args)
    net.apply_to()
    theirs = {k: tuple(v.shape) for k, v in net.state_dict().items()}

    model = Tiny()
    cfg = TrainConfig(network=network, target_modules=["to_q", "conv"], **settings)
    inj = inject_lora(model, cfg, ["to_q", "conv"], "lycoris_")
    ours = {f"{name}.{suffix}": tuple(t.shape) for name, mod in to_kohya_modules(inj).items()
            for suffix, t in mod.tensors.items()}
    ours |= {f"{name}.alpha": () for name in to_kohya_modules(inj)}
    assert ours == theirs


@pytest.mark.parametrize("network", ["loha", "lokr"])
def test_a_tiny_run_writes_a_lycoris_file_the_reader_loads(tmp_path, network):
    from lora_studio.demo import make_demo_dataset, random_demo_pipeline
    from lora_studio.lora.formats import read_lora
    from lora_studio.train.trainer import train
    from train_configs import tiny_config

    data = make_demo_dataset(tmp_path / "data", count=4)
    cfg = tiny_config(data, tmp_path / "out", network=network, steps=2, target_modules=["to_q", "conv1"])
    result = train(cfg, pipeline=random_demo_pipeline())
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == network and args["conv_dim"] == "2"
    lora = read_lora(result.lora_path)
    assert lora.modules and {m.kind for m in lora.modules.values()} == {network}


@pytest.mark.parametrize("settings, key", [
    (dict(network="loha", use_dora=True), "use_dora"),
    (dict(network="lokr", init="pissa"), "init"),
    (dict(network="loha", lora_dropout=0.1), "lora_dropout"),
    (dict(network="lora", use_tucker=True), "use_tucker"),
    (dict(network="loha", lokr_factor=4), "lokr_factor"),
    (dict(network="lokr", lokr_factor=0), "lokr_factor"),
    (dict(network="lycoris"), "network"),
])
def test_options_of_another_network_are_refused(settings, key):
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_dict(settings)

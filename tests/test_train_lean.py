"""lean_backward: frozen convolutions and GEGLUs keep less for the backward, and nothing else changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.common import SavedActivations
from lora_studio.demo import make_demo_dataset, random_demo_pipeline
from lora_studio.lora.formats import read_lora
from lora_studio.train.config import TrainConfig
from lora_studio.train.lean import lean_backward
from lora_studio.train.trainer import TrainCallbacks, train
from train_threads import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from unet_steps import lora_unet, unet_step


def _step(unet, dtype: torch.dtype):
    """``unet_step``, and the bytes of the activations it kept for the backward (weights excluded)."""
    acts = SavedActivations(at=0, weights=unet.parameters)
    acts.after_step(0)
    out, grads = unet_step(unet, dtype)
    acts.after_step(1)
    return out, grads, acts.bytes


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.bfloat16, False),
                                                  (torch.bfloat16, True)])
def test_lean_backward_keeps_less_and_changes_no_bit(dtype, channels_last):
    unet, _, _ = lora_unet(dtype, channels_last=channels_last)
    out0, grads0, kept0 = _step(unet, dtype)
    with lean_backward(unet) as changed:
        out1, grads1, kept1 = _step(unet, dtype)
    convs = sum(type(m) is nn.Conv2d for m in unet.modules())
    assert changed > convs > 0                     # every conv of the frozen UNet, and its GEGLUs
    assert kept1 < 0.9 * kept0                     # the point of it
    assert torch.equal(out0, out1)
    assert len(grads0) == len(grads1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert any(bool(g.abs().max() > 0) for g in grads1)


def test_trainable_convolutions_are_left_alone_and_forwards_come_back_even_after_an_error():
    unet, _, _ = lora_unet(torch.float32, targets=("to_q", "conv1"))  # a LoCon: conv1 gets trainable LoRA convs
    trainable = [m for m in unet.modules() if type(m) is nn.Conv2d and m.weight.requires_grad]
    assert trainable
    with pytest.raises(RuntimeError, match="boom"):
        with lean_backward(unet):
            assert not any("forward" in m.__dict__ for m in trainable)
            assert any("forward" in m.__dict__ for m in unet.modules())
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in unet.modules())
    with lean_backward(unet, enabled=False) as changed:
        assert changed == 0 and not any("forward" in m.__dict__ for m in unet.modules())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("lean-data"), count=2, repeats=1)


@pytest.mark.parametrize("precision, extra", [
    ("no", {}), ("bf16", {}),
    ("no", dict(target_modules=["to_q", "to_v", "conv1", "conv2"])),      # LoCon: the base convs inside peft's
    ("bf16", dict(use_dora=True)),                                         # DoRA
    ("no", dict(init="pissa")),                                            # PiSSA rewrites base weights
], ids=["fp32", "bf16", "locon", "dora-bf16", "pissa"])
def test_training_with_and_without_it_gives_the_same_lora(data, tmp_path, precision, extra):
    runs = {}
    for lean in (True, False):
        pipe = random_demo_pipeline()
        during = []
        cfg = TrainConfig(data_dir=str(data), output_dir=str(tmp_path / str(lean)), run_name="run", resolution=64,
                          min_bucket_reso=32, max_bucket_reso=128, bucket_reso_step=8, rank=2, alpha=2.0, steps=3,
                          batch_size=2, learning_rate=1e-2, save_precision="fp32", seed=5, mixed_precision=precision,
                          lean_backward=lean, **extra)

        def lean_modules():  # the UNet itself gets accelerate's autocast wrapper under mixed precision
            return sum("forward" in m.__dict__ for m in pipe.unet.modules() if m is not pipe.unet)

        res = train(cfg, pipeline=pipe, callbacks=TrainCallbacks(on_step=lambda s, l: during.append(lean_modules())))
        assert (min(during) > 0) if lean else (max(during) == 0)
        assert lean_modules() == 0  # the pipeline is given back plain
        runs[lean] = res.losses, read_lora(res.lora_path).modules
    (loss1, mods1), (loss0, mods0) = runs[True], runs[False]
    assert loss1 == loss0
    assert mods1.keys() == mods0.keys()
    assert all(torch.equal(mods1[k].tensors[s], mods0[k].tensors[s]) for k in mods1 for s in mods1[k].tensors)

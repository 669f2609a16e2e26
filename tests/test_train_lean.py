"""lean_backward: frozen convolutions and GEGLUs keep less for the backward, and nothing else changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from train_configs import tiny_config
from bench.common import emulate_cuda_autocast
from lora_studio.demo import make_demo_dataset, random_demo_pipeline
from lora_studio.lora.formats import read_lora
from lora_studio.train.lean import lean_backward
from lora_studio.train.trainer import TrainCallbacks, train
from train_threads import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from bench.unet_steps import kept_step, lora_unet


@pytest.mark.parametrize("dtype, channels_last, cuda_rules", [
    (torch.float32, False, False), (torch.bfloat16, False, False), (torch.bfloat16, True, False),
    (torch.bfloat16, False, True), (torch.bfloat16, True, True), (torch.float16, True, True),
], ids=["fp32", "bf16", "bf16-channels-last", "bf16-cuda-autocast", "bf16-channels-last-cuda-autocast",
        "fp16-channels-last-cuda-autocast"])
def test_lean_backward_keeps_less_and_changes_no_bit(dtype, channels_last, cuda_rules):
    unet, _, _ = lora_unet(dtype, channels_last=channels_last)
    with emulate_cuda_autocast(cuda_rules):
        out0, grads0, kept0 = kept_step(unet, dtype)
        with lean_backward(unet) as changed:
            out1, grads1, kept1 = kept_step(unet, dtype)
    kinds = {nn.Conv2d, nn.GroupNorm, nn.SiLU, nn.LayerNorm}
    assert changed > sum(type(m) in kinds for m in unet.modules()) > 0  # all of these, and the GEGLUs
    assert kept1.bytes < 0.8 * kept0.bytes         # the point of it
    if cuda_rules:  # the norms ran in fp32 as on CUDA, and kept their fp32 copies of the input without it
        assert kept0.by_dtype["float32"] > 0.25 * kept0.bytes
        assert kept1.by_dtype.get("float32", 0) < 0.05 * kept1.bytes  # norm statistics, attention logsumexp
    assert torch.equal(out0, out1)
    assert len(grads0) == len(grads1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert any(bool(g.abs().max() > 0) for g in grads1)


class _NormThenAct(nn.Module):
    """A group norm, something in between (or not), then SiLU: the SiLU recomputes its input only when it is the
    norm's output as it came out."""

    def __init__(self, between):
        super().__init__()
        self.norm, self.act, self.between = nn.GroupNorm(2, 4), nn.SiLU(), between

    def forward(self, x):
        return self.act(self.between(self.norm(x)))


@pytest.mark.parametrize("between", [lambda y: y, lambda y: y.mul_(2.0), lambda y: y[:, :2]],
                         ids=["direct", "changed-in-place", "a-view"])
def test_silu_after_a_group_norm_gives_the_same_gradients(between):
    model = _NormThenAct(between).double().requires_grad_(False)
    model.norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    results = []
    for lean in (False, True):
        xi = x.clone().requires_grad_(True)
        with lean_backward(model, enabled=lean):
            out = model(xi)
            (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), xi.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.autograd.gradcheck(lambda t: lean_model_call(model, t), (x[:1].clone().requires_grad_(True),))


def lean_model_call(model, x):
    with lean_backward(model):
        return model(x)


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


@pytest.mark.parametrize("precision, extra, cuda_rules", [
    ("no", {}, False), ("bf16", {}, False), ("bf16", {}, True),
    ("no", dict(target_modules=["to_q", "to_v", "conv1", "conv2"]), False),  # LoCon: the base convs inside peft's
    ("bf16", dict(use_dora=True), False),                                      # DoRA
    ("no", dict(init="pissa"), False),                                         # PiSSA rewrites base weights
], ids=["fp32", "bf16", "bf16-cuda-autocast", "locon", "dora-bf16", "pissa"])
def test_training_with_and_without_it_gives_the_same_lora(data, tmp_path, precision, extra, cuda_rules):
    runs = {}
    for lean in (True, False):
        pipe = random_demo_pipeline()
        during = []
        cfg = tiny_config(data, tmp_path / str(lean), seed=5, mixed_precision=precision, lean_backward=lean, **extra)

        def lean_modules():  # the UNet itself gets accelerate's autocast wrapper under mixed precision
            return sum("forward" in m.__dict__ for m in pipe.unet.modules() if m is not pipe.unet)

        with emulate_cuda_autocast(cuda_rules):
            res = train(cfg, pipeline=pipe,
                        callbacks=TrainCallbacks(on_step=lambda s, l: during.append(lean_modules())))
        assert (min(during) > 0) if lean else (max(during) == 0)
        assert lean_modules() == 0  # the pipeline is given back plain
        runs[lean] = res.losses, read_lora(res.lora_path).modules
    (loss1, mods1), (loss0, mods0) = runs[True], runs[False]
    assert loss1 == loss0
    assert mods1.keys() == mods0.keys()
    assert all(torch.equal(mods1[k].tensors[s], mods0[k].tensors[s]) for k in mods1 for s in mods1[k].tensors)


def _graph_nodes(t: torch.Tensor) -> set[str]:
    """The type names of every autograd node ``t`` was made through."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        n = todo.pop()
        if n is not None and n not in seen:
            seen.add(n)
            todo += [f for f, _ in n.next_functions]
    return {type(n).__name__ for n in seen}


def test_under_torch_compile_the_modules_own_forwards_run_and_the_graph_stays_whole():
    """Compiling plans what the backward keeps by itself; a lean forward's tensor tag would break the graph."""
    import torch._dynamo

    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.LayerNorm(6))
    model.requires_grad_(False)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    with lean_backward(model):
        eager = model(x)
        assert {"LeanSiluBackward", "LeanGroupNormBackward", "FrozenConv2dBackward"} <= _graph_nodes(eager)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, backend="eager")(x)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch.allclose(compiled, eager, atol=1e-6)

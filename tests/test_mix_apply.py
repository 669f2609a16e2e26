"""LoraMixer on the demo model: numerical truth against diffusers and the formula, exact restore,
re-weighting without file reads, per-block weights, unmatched-key reporting and wrong-family refusal."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from lora_factories import demo_or_random_pipeline, write_kohya_lora, write_lokr, write_sdxl_lora
from lora_studio.errors import ConfigError, FamilyMismatchError, LoraFormatError
from lora_studio.mix import LoraMixer


@pytest.fixture(scope="module")
def base_pipe():
    return demo_or_random_pipeline()


@pytest.fixture()
def pipe(base_pipe):
    return copy.deepcopy(base_pipe)


def params(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for comp in ("unet", "text_encoder"):
        for k, v in getattr(pipe, comp).state_dict().items():
            out[f"{comp}.{k}"] = v.detach().clone()
    return out


def formula_weight(pipe, file, strength, component, module) -> torch.Tensor:
    """W0 + s * alpha/r * up @ down, written out from the file's tensors (independent of lora_studio)."""
    up, down, scale = file_factors(file, component, module)
    w0 = getattr(pipe, component).get_submodule(module).weight.double()
    delta = (up @ down).reshape(w0.shape) * scale
    return w0 + strength * delta


def file_factors(file, component, module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A kohya module's (up, down) as 2-D fp64 tensors and its alpha / rank, read straight from the file."""
    sd = load_file(str(file))
    prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
    name = prefix + module.replace(".", "_")
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else down.shape[0]
    return up.flatten(1), down.flatten(1), alpha / down.shape[0]


def test_apply_equals_diffusers_fuse_and_formula(tmp_path, pipe):
    file = write_kohya_lora(tmp_path / "style.safetensors", pipe, rank=4, alpha=2.0, conv=True)
    reference = copy.deepcopy(pipe)
    base = copy.deepcopy(pipe)
    mixer = LoraMixer(pipe)
    mixer.add(file, strength=0.7)
    mixer.apply()
    reference.load_lora_weights(str(file))
    reference.fuse_lora(lora_scale=0.7)
    reference.unload_lora_weights()
    ours, theirs, before = params(pipe), params(reference), params(base)
    changed = [k for k in ours if not torch.equal(ours[k], before[k])]
    assert len(changed) > 50  # attention, conv and text-encoder weights all moved
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=1e-5), k
    for comp, module in [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
                         ("unet", "up_blocks.1.resnets.0.conv1"), ("text_encoder", "encoder.layers.1.mlp.fc2")]:
        got = getattr(pipe, comp).get_submodule(module).weight.double()
        assert torch.allclose(got, formula_weight(base, file, 0.7, comp, module), atol=1e-6)


def test_restore_is_bit_identical(tmp_path, pipe):
    before = params(pipe)
    mixer = LoraMixer(pipe)
    mixer.add(write_kohya_lora(tmp_path / "a.safetensors", pipe, conv=True), strength=1.3)
    mixer.add(write_lokr(tmp_path / "b.safetensors", pipe, seed=1), strength=-0.6)
    mixer.apply()
    mixer.set_strength("a", unet=0.2)
    mixer.apply()
    assert any(not torch.equal(v, before[k]) for k, v in params(pipe).items())
    mixer.restore()
    after = params(pipe)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_reweighting_reads_no_file_and_mixes_linearly(tmp_path, pipe, monkeypatch):
    import lora_studio.lora.formats as formats

    reads = []
    real = formats.load_safetensors
    monkeypatch.setattr(formats, "load_safetensors", lambda p, *a, **k: reads.append(p) or real(p, *a, **k))
    fa = write_kohya_lora(tmp_path / "a.safetensors", pipe, seed=1)
    fb = write_kohya_lora(tmp_path / "b.safetensors", pipe, seed=2, alpha=None)
    base = copy.deepcopy(pipe)
    mixer = LoraMixer(pipe)
    mixer.add(fa, strength=0.5)
    mixer.add(fb, strength=0.5)
    assert len(reads) == 2
    for sa, sb in [(1.0, -0.5), (0.25, 2.0), (0.0, 0.0)]:
        mixer.set_strength("a", unet=sa, te=sa)
        mixer.set_strength("b", unet=sb, te=sb)
        mixer.apply()
        module = "mid_block.attentions.0.transformer_blocks.0.attn1.to_v"
        want = formula_weight(base, fa, sa, "unet", module) + formula_weight(base, fb, sb, "unet", module) \
            - base.unet.get_submodule(module).weight.double()
        assert torch.allclose(pipe.unet.get_submodule(module).weight.double(), want, atol=1e-6)
    assert len(reads) == 2  # re-weighting used the factors kept in memory
    base_params = params(base)
    assert all(torch.equal(v, base_params[k]) for k, v in params(pipe).items())  # strengths 0 -> W0 exactly


def test_te_strength_and_block_weights(tmp_path, pipe):
    file = write_kohya_lora(tmp_path / "a.safetensors", pipe)
    base = copy.deepcopy(pipe)
    mixer = LoraMixer(pipe)
    mixer.add(file, strength=1.0, te_strength=0.0, block_weights={"down": 0.0, "up.1": 2.0, "mid": 0.5})
    mixer.apply()
    w = lambda p, m: p.unet.get_submodule(m).weight.double()
    down = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    up0 = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    up1 = "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"
    mid = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(w(pipe, down), w(base, down))
    assert torch.allclose(w(pipe, up0), formula_weight(base, file, 1.0, "unet", up0), atol=1e-6)
    assert torch.allclose(w(pipe, up1), formula_weight(base, file, 2.0, "unet", up1), atol=1e-6)
    assert torch.allclose(w(pipe, mid), formula_weight(base, file, 0.5, "unet", mid), atol=1e-6)
    te = params(pipe)
    assert all(torch.equal(te[k], v) for k, v in params(base).items() if k.startswith("text_encoder."))
    with pytest.raises(ConfigError, match="down.7"):
        mixer.set_strength(mixer.entries[0].name, blocks={"down.7": 1.0})
    # the text encoder can be made to follow the UNet strength again
    name = mixer.entries[0].name
    mixer.set_strength(name, unet=0.7, te_follows_unet=True)
    assert mixer.entries[0].te_strength is None and mixer.entries[0].effective_te_strength == 0.7
    mixer.apply()
    te_module = "encoder.layers.1.self_attn.q_proj"
    got = pipe.text_encoder.get_submodule(te_module).weight.double()
    assert torch.allclose(got, formula_weight(base, file, 0.7, "text_encoder", te_module), atol=1e-6)
    with pytest.raises(ConfigError, match="not both"):
        mixer.set_strength(name, te=0.2, te_follows_unet=True)


def test_unmatched_keys_are_reported_never_dropped(tmp_path, pipe):
    from safetensors.torch import save_file

    file = write_kohya_lora(tmp_path / "a.safetensors", pipe)
    sd = load_file(str(file))
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    mixer = LoraMixer(pipe)
    with pytest.raises(LoraFormatError, match="lora_unet_down_blocks_9_attentions_0_proj_in"):
        mixer.add(tmp_path / "extra.safetensors")
    assert mixer.entries == []
    name = mixer.add(tmp_path / "extra.safetensors", allow_partial=True)
    entry = mixer.entries[0]
    assert entry.unmatched == ["lora_unet_down_blocks_9_attentions_0_proj_in"]
    assert entry.matched == len({k.split(".")[0] for k in sd}) - 1
    report = mixer.report()
    assert name in report and "1 unmatched" in report and "down_blocks_9" in report


def test_wrong_family_is_refused_naming_both(tmp_path, pipe):
    mixer = LoraMixer(pipe)
    with pytest.raises(FamilyMismatchError) as err:
        mixer.add(write_sdxl_lora(tmp_path / "xl.safetensors"))
    assert "SDXL" in str(err.value) and "SD 1.x" in str(err.value)


def test_lora_for_another_size_is_refused(tmp_path, pipe):
    from lora_studio.fileio import save_safetensors_atomic

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_safetensors_atomic({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight":
                             torch.zeros(320, 4)}, tmp_path / "big.safetensors")
    with pytest.raises(LoraFormatError, match="another size"):
        LoraMixer(pipe).add(tmp_path / "big.safetensors")


@pytest.mark.slow
def test_sdxl_kohya_ldm_names_equal_diffusers_fuse():
    """kohya SDXL names (input_blocks/middle_block/output_blocks, lora_te1_/lora_te2_) on a tiny SDXL pipeline."""
    import tempfile
    from pathlib import Path

    from lora_factories import write_kohya_sdxl_lora
    from tiny_families import tiny_pipeline

    pipe = tiny_pipeline("sdxl")
    with tempfile.TemporaryDirectory() as tmp:
        file = write_kohya_sdxl_lora(Path(tmp) / "xl.safetensors", pipe, conv=True)
        reference, base = copy.deepcopy(pipe), copy.deepcopy(pipe)
        mixer = LoraMixer(pipe)
        mixer.add(file, strength=0.8)
        assert mixer.entries[0].unmatched == [] and any("input_blocks" in n for n in mixer.entries[0].targets)
        mixer.apply()
        reference.load_lora_weights(str(file))
        reference.fuse_lora(lora_scale=0.8)
        reference.unload_lora_weights()
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        ours, theirs, before = (getattr(p, comp).state_dict() for p in (pipe, reference, base))
        assert any(not torch.equal(ours[k], before[k]) for k in ours), comp
        for k in ours:
            assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=1e-5), (comp, k)


def test_sd2_lora_on_sd1_model_names_both_families(tmp_path, pipe):
    from tiny_families import tiny_pipeline

    sd2 = tiny_pipeline("sd2")
    file = write_kohya_lora(tmp_path / "sd2.safetensors", sd2, metadata={"ss_base_model_version": "sd_v2"})
    with pytest.raises(FamilyMismatchError) as err:
        LoraMixer(pipe).add(file)
    assert "SD 2.x" in str(err.value) and "SD 1.x" in str(err.value)
    with pytest.raises(FamilyMismatchError, match="SD 1.x.*SD 2.x"):
        LoraMixer(sd2).add(write_kohya_lora(tmp_path / "sd1.safetensors", pipe))


def test_dora_and_loha_mix_by_their_formulas(tmp_path, pipe):
    from lora_factories import write_dora, write_loha

    fd = write_dora(tmp_path / "d.safetensors", pipe, direction="in")
    fh = write_loha(tmp_path / "h.safetensors", pipe, rank=2, alpha=1.0)
    base = copy.deepcopy(pipe)
    mixer = LoraMixer(pipe)
    mixer.add(fd, strength=0.5)
    mixer.add(fh, strength=-1.0)
    mixer.apply()
    module = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    name = "lora_unet_" + module.replace(".", "_")
    d, h = load_file(str(fd)), load_file(str(fh))
    w0 = base.unet.get_submodule(module).weight.double()
    merged = w0 + d[f"{name}.lora_up.weight"].double() @ d[f"{name}.lora_down.weight"].double() * 2.0 / 4
    dora = d[f"{name}.dora_scale"].double() * merged / merged.norm(dim=0, keepdim=True)  # per input column
    loha = (h[f"{name}.hada_w1_a"].double() @ h[f"{name}.hada_w1_b"].double()) * \
        (h[f"{name}.hada_w2_a"].double() @ h[f"{name}.hada_w2_b"].double()) * (1.0 / 2)
    want = w0 + 0.5 * (dora - w0) - 1.0 * loha
    assert torch.allclose(pipe.unet.get_submodule(module).weight.double(), want, atol=1e-6)
    assert [e.kind for e in mixer.entries] == ["LoRA, DoRA", "LoHa"]


def test_remove_returns_its_modules_to_w0_and_names_are_unique(tmp_path, pipe):
    fa = write_kohya_lora(tmp_path / "a.safetensors", pipe, seed=1)
    fb = write_kohya_lora(tmp_path / "b.safetensors", pipe, seed=2, conv=True)
    before = params(pipe)
    mixer = LoraMixer(pipe)
    assert [mixer.add(fa), mixer.add(fa, strength=0.3), mixer.add(fb, name="b")] == ["a", "a_2", "b"]
    mixer.apply()
    mixer.remove("b")
    mixer.remove("a_2")
    mixer.apply()
    only_a = copy.deepcopy(pipe)
    mixer.remove("a")
    mixer.apply()
    assert all(torch.equal(v, before[k]) for k, v in params(pipe).items())
    fresh = LoraMixer(pipe)
    fresh.add(fa)
    fresh.apply()
    want = params(only_a)
    assert all(torch.equal(v, want[k]) for k, v in params(pipe).items())
    with pytest.raises(ConfigError, match="no LoRA named 'zzz'.*a"):
        fresh.set_strength("zzz", unet=1.0)


def test_apply_recomputes_only_weights_whose_terms_changed(tmp_path, pipe, monkeypatch):
    import lora_studio.mix.mixer as mix

    calls = []  # one name per delta computed, by either path (one low-rank product, or module_delta)
    real, real_factors = mix.module_delta, LoraMixer._factors
    monkeypatch.setattr(mix, "module_delta", lambda mod, *a, **k: calls.append(mod.name) or real(mod, *a, **k))
    monkeypatch.setattr(LoraMixer, "_factors",
                        lambda self, mod, *a: calls.append(mod.name) or real_factors(self, mod, *a))
    file = write_kohya_lora(tmp_path / "a.safetensors", pipe)
    mixer = LoraMixer(pipe)
    mixer.add(file)
    mixer.apply()
    n_all = len(calls)
    assert n_all == mixer.entries[0].matched
    mixer.apply()
    assert len(calls) == n_all  # nothing changed: nothing recomputed
    mixer.set_strength("a", te=0.5)
    mixer.apply()
    te_calls = calls[n_all:]
    assert te_calls and all(n.startswith("lora_te_") for n in te_calls) and len(te_calls) == 12
    mixer.set_strength("a", blocks={"up.1": 0.0})
    before = len(calls)
    mixer.apply()
    assert len(calls) == before  # up.1 set to zero: its weights go back to W0 without any delta
    mixer.restore()
    mixer.apply()  # after restore() everything with a non-zero coefficient is computed again
    live = sum(1 for comp, m in mixer.entries[0].targets.values() if not m.startswith("up_blocks.1."))
    assert len(calls) - before == live < n_all


def test_overflowing_mix_is_refused_and_leaves_weights_usable(tmp_path, pipe):
    from lora_studio.errors import LoraStudioError

    pipe.unet.half()
    before = params(pipe)
    mixer = LoraMixer(pipe)
    mixer.add(write_kohya_lora(tmp_path / "a.safetensors", pipe, te=False))
    mixer.set_strength("a", unet=1e7)
    with pytest.raises(LoraStudioError, match="lower the strengths"):
        mixer.apply()
    mixer.set_strength("a", unet=0.5)
    mixer.apply()
    assert pipe.unet.conv_in.weight.dtype == torch.float16
    assert all(bool(torch.isfinite(v).all()) for v in params(pipe).values())
    mixer.restore()
    assert all(torch.equal(v, before[k]) for k, v in params(pipe).items())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_file_equals_diffusers_fuse(tmp_path, family):
    """A diffusers/peft-layout file (lora_A/lora_B, lora_alpha in lora_adapter_metadata), both text encoders."""
    from lora_factories import write_peft_lora
    from tiny_families import tiny_pipeline

    pipe = tiny_pipeline(family)
    file = write_peft_lora(tmp_path / "p.safetensors", pipe, rank=4, alpha=8.0)
    reference, base = copy.deepcopy(pipe), copy.deepcopy(pipe)
    mixer = LoraMixer(pipe)
    mixer.add(file, strength=0.6)
    mixer.apply()
    reference.load_lora_weights(str(file))
    reference.fuse_lora(lora_scale=0.6)
    reference.unload_lora_weights()
    comps = ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for comp in comps:
        ours, theirs, before = (getattr(p, comp).state_dict() for p in (pipe, reference, base))
        assert any(not torch.equal(ours[k], before[k]) for k in ours), comp
        for k in ours:
            assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=1e-5), (comp, k)


def test_lora_block_weight_names(tmp_path, pipe):
    """The LoRA Block Weight extension's layer names (ldm numbering) and its BASE (text encoder) weight."""
    from lora_studio.mix import lbw_block_weights

    file = write_kohya_lora(tmp_path / "a.safetensors", pipe)
    base = copy.deepcopy(pipe)
    mixer = LoraMixer(pipe)
    mixer.add(file, strength=1.0, block_weights={"IN01": 0.0, "OUT03": 2.0, "BASE": 0.5, "down": 3.0})
    mixer.apply()
    w = lambda p, c, m: getattr(p, c).get_submodule(m).weight.double()
    in1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"   # input_blocks.1
    in3 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"   # input_blocks.3: falls back to "down"
    out3 = "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"    # output_blocks.3
    te = "encoder.layers.0.self_attn.q_proj"
    assert torch.equal(w(pipe, "unet", in1), w(base, "unet", in1))
    assert torch.allclose(w(pipe, "unet", in3), formula_weight(base, file, 3.0, "unet", in3), atol=1e-6)
    assert torch.allclose(w(pipe, "unet", out3), formula_weight(base, file, 2.0, "unet", out3), atol=1e-6)
    assert torch.allclose(w(pipe, "text_encoder", te), formula_weight(base, file, 0.5, "text_encoder", te), atol=1e-6)
    sd1 = lbw_block_weights("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1")
    assert sd1["BASE"] == 1.0 and sd1["IN08"] == 0.0 and sd1["M00"] == 0.0 and sd1["OUT11"] == 1.0 and len(sd1) == 17
    assert list(lbw_block_weights([1] * 12))[1:6] == ["IN04", "IN05", "IN07", "IN08", "M00"]
    mixer.set_strength("a", blocks=sd1)  # names this toy model lacks (IN04...) are accepted, as A1111 lists are
    with pytest.raises(ConfigError, match="17 or 26"):
        lbw_block_weights("1,0,1")
    with pytest.raises(ConfigError, match="IN99"):
        mixer.set_strength("a", blocks={"IN99": 1.0})


def abs_product(file, module) -> torch.Tensor:
    """|up| @ |down| * alpha / r of a UNet module: what bounds the rounding error of up @ down."""
    up, down, scale = file_factors(file, "unet", module)
    return (up.abs() @ down.abs()) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_loras", [1, 2])
def test_low_rank_fast_path_matches_the_exact_merge_in_every_weight_dtype(tmp_path, pipe, dtype, n_loras):
    """apply() writes plain LoRA products with addmm into the weight (bf16 factors for one LoRA on bf16 weights);
    each weight is the fp64 formula to within one rounding of the result and the dot products' rounding error
    (at most rank + 2 steps of sum |up| |down|; bf16 factors add one step each)."""
    pipe.unet.to(dtype)
    files = [write_kohya_lora(tmp_path / f"l{i}.safetensors", pipe, rank=4, alpha=2.0, te=False, seed=i)
             for i in range(n_loras)]
    strengths = [0.8, -0.6][:n_loras]
    w0 = params(pipe)
    mixer = LoraMixer(pipe)
    for f, s in zip(files, strengths):
        mixer.add(f, strength=s)
    targets = sorted({m for e in mixer.entries for _, m in e.targets.values()})
    deltas = {m: [s * (formula_weight(pipe, f, 1.0, "unet", m) - w0[f"unet.{m}.weight"].double())
                  for f, s in zip(files, strengths)] for m in targets}
    sizes = {m: sum(abs(s) * abs_product(f, m) for f, s in zip(files, strengths)) for m in targets}
    mixer.apply()
    dtypes = {k[2] for k in mixer._factors_cache}
    assert dtypes == {torch.bfloat16 if dtype == torch.bfloat16 and n_loras == 1 else torch.float32}
    assert len(targets) > 10
    eps = torch.finfo(dtype).eps
    for m in targets:
        w = pipe.unet.get_submodule(m).weight
        assert w.dtype == dtype
        exact = w0[f"unet.{m}.weight"].double() + sum(deltas[m])
        err = (w.double() - exact).abs()
        allowed = eps * (exact.abs() + 8 * sizes[m])
        assert bool((err <= allowed).all()), (m, float((err / allowed).max()))
        assert not torch.equal(w, w0[f"unet.{m}.weight"])
    mixer.restore()
    assert all(torch.equal(v, w0[k]) for k, v in params(pipe).items())


def test_layers_the_fast_path_cannot_take_still_merge(tmp_path, pipe, monkeypatch):
    """LoKr modules (not one product) go through module_delta; plain LoRA modules do not."""
    import lora_studio.mix.mixer as mix

    used = []
    real = mix.module_delta
    monkeypatch.setattr(mix, "module_delta", lambda mod, *a, **k: used.append(mod.kind) or real(mod, *a, **k))
    mixer = LoraMixer(pipe)
    mixer.add(write_kohya_lora(tmp_path / "a.safetensors", pipe, te=False), strength=0.5)
    mixer.apply()
    assert used == []
    mixer.add(write_lokr(tmp_path / "k.safetensors", pipe), strength=0.5)
    mixer.apply()
    assert "lokr" in used  # (layers both files touch take module_delta for both terms)


def test_originals_stay_on_a_gpu_only_with_room_to_spare(monkeypatch):
    """W0 stays on a CUDA device (no copy to the host and back on each apply) only while a second copy of the
    touched weights leaves the rendering reserve free; PyTorch's cached-but-unused memory counts as free."""
    from lora_studio.mix import originals as mix

    gib = 2**30
    state = {"free": 30 * gib, "total": 80 * gib, "reserved": 0, "allocated": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], state["total"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    cuda = torch.device("cuda", 0)
    # an 80 GiB card keeps a quarter (20 GiB) free
    assert mix.originals_fit_on_device(cuda, 5 * gib)
    assert not mix.originals_fit_on_device(cuda, 11 * gib)
    state.update(reserved=3 * gib, allocated=1 * gib)  # 2 GiB cached by PyTorch, free to reuse
    assert mix.originals_fit_on_device(cuda, 11 * gib)
    # an 8 GiB card keeps 3 GiB free (more than a quarter)
    state.update(free=4 * gib, total=8 * gib, reserved=0, allocated=0)
    assert mix.originals_fit_on_device(cuda, gib // 2)
    assert not mix.originals_fit_on_device(cuda, 3 * gib // 2)
    # the CPU always keeps them in place; a device whose free memory cannot be asked never does
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("asked the GPU for the CPU"))
    assert mix.originals_fit_on_device(torch.device("cpu"), 100 * gib)
    assert not mix.originals_fit_on_device(torch.device("mps"), 1)


def test_the_keep_originals_option_decides_per_device_and_the_cpu_keeps_in_place(monkeypatch):
    from lora_studio.mix import originals as mix_originals

    params = [torch.nn.Parameter(torch.zeros(4, 4)) for _ in range(2)]
    monkeypatch.setattr(mix_originals, "originals_fit_on_device", lambda dev, n: pytest.fail("asked about the CPU"))
    for option in (None, True, False):  # the CPU never copies its originals, whatever the option says
        assert mix_originals.keep_in_place(params, option) == {torch.device("cpu"): True}
    asked = []
    monkeypatch.setattr(mix_originals, "originals_fit_on_device", lambda dev, n: asked.append((dev, n)) or False)
    meta = [torch.nn.Parameter(torch.zeros(4, 4, device="meta")), torch.nn.Parameter(torch.zeros(2, 8, device="meta"))]
    assert mix_originals.keep_in_place(meta, None) == {torch.device("meta"): False}
    assert asked == [(torch.device("meta"), 2 * 16 * 4)]  # one question per device, for all its bytes
    assert mix_originals.keep_in_place(meta, True) == {torch.device("meta"): True}
    assert len(asked) == 1


def test_the_mixer_passes_its_keep_originals_option_on(pipe, tmp_path, monkeypatch):
    from lora_studio.mix import mixer as mix

    path = write_kohya_lora(tmp_path / "a.safetensors", pipe, rank=2)
    seen = []
    real = mix.keep_in_place
    monkeypatch.setattr(mix, "keep_in_place", lambda params, option: seen.append((len(params), option))
                        or real(params, option))
    mixer = LoraMixer(pipe, keep_originals_on_device=False)
    mixer.add(path)
    mixer.apply()
    mixer.apply()  # nothing fresh the second time
    mixer.restore()
    assert seen[0][0] > 0 and seen[0][1] is False and all(n == 0 for n, _ in seen[1:])


def _wrecking_twin(tmp_path, pipe, file, mixer, kind: str):
    """A one-module LoRA on the weight the mixer writes last, far too large for it: that module of ``file`` with
    alpha 1e12 ("product": the addmm path) or a plain diff of 1e30 ("full": the general path). Returns the
    file, its kohya module name and the weight's key."""
    from safetensors.torch import save_file

    key = list(mixer._originals)[-1]
    name = next(n for n, k in mixer.entries[0].targets.items() if k == key)
    if kind == "product":
        tensors = {k: v for k, v in load_file(str(file)).items() if k.startswith(name + ".")}
        tensors[f"{name}.alpha"] = torch.tensor(1e12)
    else:
        weight = getattr(pipe, key[0]).get_submodule(key[1]).weight
        tensors = {f"{name}.diff": torch.full(tuple(weight.shape), 1e30)}
    save_file(tensors, str(tmp_path / "wreck.safetensors"))
    return tmp_path / "wreck.safetensors", name, key


@pytest.mark.parametrize("kind", ["product", "full"])
def test_lora_that_would_wreck_a_weight_is_refused_and_the_mix_stays_as_it_was(tmp_path, pipe, kind):
    """A LoRA whose delta at its strength is over MAX_DELTA_RATIO times the weight's norm is refused, with the
    file, the module and the ratio named; every weight keeps exactly what the last good apply() wrote, though
    all the others were rewritten (new strength) before the bad one was reached."""
    from lora_studio.errors import ExportError
    from lora_studio.lora.formats import read_lora
    from lora_studio.lora.math import module_delta

    w0 = params(pipe)
    a = write_kohya_lora(tmp_path / "a.safetensors", pipe)
    mixer = LoraMixer(pipe)
    mixer.add(a)
    mixer.apply()
    mixed = params(pipe)
    bad, name, key = _wrecking_twin(tmp_path, pipe, a, mixer, kind)
    mixer.set_strength("a", unet=0.5)
    mixer.add(bad, name="wreck", strength=0.7)
    with pytest.raises(ExportError) as info:
        mixer.apply()
    msg = str(info.value)
    assert f"LoRA wreck.safetensors at strength 0.7 on {key[0]}.{key[1]} (module {name})" in msg
    assert "limit is 10000 times" in msg and "lower the strengths" in msg and "left as they were" in msg
    base = w0[f"{key[0]}.{key[1]}.weight"]
    delta = module_delta(read_lora(bad).modules[name], tuple(base.shape)).double() * 0.7
    ratio = float(msg.split("would change it by ")[1].split(" times")[0])
    assert ratio == pytest.approx(float(delta.norm() / base.double().norm()), rel=1e-3)
    assert all(torch.equal(v, mixed[k]) for k, v in params(pipe).items())
    mixer.remove("wreck")
    mixer.apply()
    half = params(pipe)
    assert not torch.equal(half[f"{key[0]}.{key[1]}.weight"], mixed[f"{key[0]}.{key[1]}.weight"])
    mixer.restore()
    assert all(torch.equal(v, w0[k]) for k, v in params(pipe).items())


def test_mix_beyond_fp16_names_the_layer_and_files_and_changes_nothing(tmp_path, pipe):
    """Deltas well under the ratio limit can still pass fp16's 65504 on a weight of large values: refused after
    the cast, naming the layer and the files, with the earlier mix kept and a first-touched weight back at W0."""
    import bad_inputs as B
    from lora_studio.errors import ExportError

    pipe.unet.half()
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    with torch.no_grad():
        layer.weight.fill_(6e4)
    w0 = params(pipe)
    mixer = LoraMixer(pipe)
    mixer.add(write_kohya_lora(tmp_path / "a.safetensors", pipe, te=False))
    mixer.apply()
    mixed = params(pipe)
    tensors = B.lora_pair()
    tensors[f"{B.MODULE}.alpha"] = torch.tensor(2e6)  # deltas of ~1e4 on weights of 6e4: 0.3 times their norm
    mixer.add(B.lora_file(tmp_path, "big.safetensors", tensors))
    with pytest.raises(ExportError) as info:
        mixer.apply()
    B.assert_helpful(info.value, (("out of torch.float16's range",), ("attn1.to_q",), ("a.safetensors, big",)))
    assert all(torch.equal(v, mixed[k]) for k, v in params(pipe).items())
    mixer.restore()
    assert all(torch.equal(v, w0[k]) for k, v in params(pipe).items())


def test_ratio_limit_reads_a_whole_weight_only_where_its_first_rows_do_not_settle_it(tmp_path, pipe):
    """The limit is checked against the norm of W0's first rows (a lower bound, read with every new weight);
    the whole W0 is read only where that does not settle it: a weight whose first rows are zero still takes a
    normal LoRA, and an all-zero weight has no limit. Nothing else reads a whole weight."""
    from lora_studio.mix.limits import FLOOR_ROWS

    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    with torch.no_grad():
        attn.attn1.to_q.weight[:FLOOR_ROWS] = 0
        attn.attn1.to_k.weight.zero_()
    w0 = params(pipe)
    mixer = LoraMixer(pipe)
    mixer.add(write_kohya_lora(tmp_path / "a.safetensors", pipe, te=False))
    mixer.apply()
    prefix = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert set(mixer._sizes.norm) == {("unet", f"{prefix}.to_q"), ("unet", f"{prefix}.to_k")}
    assert mixer._sizes.norm[("unet", f"{prefix}.to_k")] == 0.0
    for name in ("to_q", "to_k"):
        assert not torch.equal(w0[f"unet.{prefix}.{name}.weight"], getattr(attn.attn1, name).weight)
    mixer.restore()
    assert all(torch.equal(v, w0[k]) for k, v in params(pipe).items())

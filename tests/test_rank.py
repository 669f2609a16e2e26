"""Rank math: rank choice, SVD factoring, resize, concat/SVD merge, extraction (pure torch, no model)."""

from __future__ import annotations

import pytest
import torch

from lora_studio.errors import ConfigError, LoraFormatError
from lora_studio.lora.formats import LoraModule
from lora_studio.lora.rank import (
    choose_rank, concat_merge, energy_at, extract_delta, module_delta_full, module_spectrum, resize_module,
    singular_values, summarize, svd_lowrank_factors, svd_merge,
)


def known_spectrum(s: list[float], rows: int = 12, cols: int = 9, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U, V: a matrix whose singular values are exactly ``s``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def lora(name: str, out: int, inn: int, r: int, alpha: float | None, conv: bool = False, seed: int = 0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    if conv:
        down, up = torch.randn(r, inn, 3, 3, generator=g), torch.randn(out, r, 1, 1, generator=g)
    else:
        down, up = torch.randn(r, inn, generator=g), torch.randn(out, r, generator=g)
    return LoraModule.from_updown(name, down, up, alpha)


def reference_delta(mod: LoraModule) -> torch.Tensor:
    """kohya's formula written out independently of rank.py."""
    down, up = mod.tensors["lora_down.weight"].double(), mod.tensors["lora_up.weight"].double()
    alpha = mod.alpha if mod.alpha is not None else down.shape[0]
    prod = up.flatten(1) @ down.flatten(1) * (alpha / down.shape[0])
    return prod.reshape(up.shape[0], *down.shape[1:])


# ----------------------------------------------------------------------------- choose_rank
def test_energy_picks_hand_computed_rank_on_known_spectrum():
    # energies 16, 9, 4, 1 (+ 0.25, 0.04) of 30.29: cumulative 0.528, 0.825, 0.957, 0.990, 0.9987, 1
    s = [4.0, 3.0, 2.0, 1.0, 0.5, 0.2]
    w = known_spectrum(s)
    sv = singular_values(w.float())
    assert torch.allclose(sv[:6], torch.tensor(s), atol=1e-5) and sv[6:].abs().max() < 1e-5
    assert choose_rank(sv, "energy", 0.5) == 1
    assert choose_rank(sv, "energy", 0.8) == 2
    assert choose_rank(sv, "energy", 0.9) == 3
    assert choose_rank(sv, "energy", 0.95) == 3
    assert choose_rank(sv, "energy", 0.96) == 4
    assert choose_rank(sv, "energy", 0.999) == 6
    assert choose_rank(sv, "energy", 1.0) == 6
    assert energy_at(sv, 3) == pytest.approx(29 / 30.29, rel=1e-5)


def test_ratio_and_fixed_rank_rules():
    sv = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.01])
    assert choose_rank(sv, "ratio", 10) == 3      # keep s >= 1.0
    assert choose_rank(sv, "ratio", 2) == 2       # keep s >= 5.0
    assert choose_rank(sv, "ratio", 1) == 1
    assert choose_rank(sv, "fixed", 4) == 4
    assert choose_rank(sv, "fixed", 64) == 5      # capped at the number of singular values
    assert choose_rank(torch.zeros(4), "energy", 0.9) == 1


@pytest.mark.parametrize("method,value", [("energy", 0), ("energy", 1.5), ("ratio", 0.5), ("fixed", 0),
                                          ("fixed", 2.5), ("svd", 3)])
def test_bad_rank_arguments_are_user_errors_naming_the_value(method, value):
    bad = method if method == "svd" else str(value).replace(".", r"\.")
    with pytest.raises(ConfigError, match=bad):
        choose_rank(torch.ones(3), method, value)


# ----------------------------------------------------------------------------- factoring
@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (8, 6, 3, 3)])
def test_full_rank_factors_reconstruct_exactly(shape):
    delta = torch.randn(*shape)
    full = min(shape[0], int(torch.tensor(shape[1:]).prod()))
    up, down = svd_lowrank_factors(delta, full)
    if len(shape) == 4:
        assert down.shape == (full, *shape[1:]) and up.shape == (shape[0], full, 1, 1)
    recon = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    assert torch.allclose(recon, delta, atol=1e-5)


def test_truncated_factors_are_the_best_approximation():
    w = known_spectrum([5.0, 4.0, 0.3, 0.1]).float()
    up, down = svd_lowrank_factors(w, 2)
    err = torch.linalg.norm(up @ down - w)
    assert err == pytest.approx((0.3 ** 2 + 0.1 ** 2) ** 0.5, rel=1e-4)  # Eckart-Young


# ----------------------------------------------------------------------------- resize
@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("alpha", [None, 4.0, 1.0])
def test_resize_at_full_rank_keeps_the_effective_delta(conv, alpha):
    mod = lora("m", 12, 10, 8, alpha, conv=conv)
    new, stat = resize_module(mod, "fixed", 8)
    assert new.rank == 8 and stat.new_rank == 8 and stat.old_rank == 8
    assert stat.energy_kept == pytest.approx(1.0)
    assert torch.allclose(reference_delta(new), reference_delta(mod), atol=1e-4)
    # alpha keeps the module's alpha/rank ratio
    assert new.scale == pytest.approx(mod.scale)


def test_resize_truncates_to_the_energy_rank_and_reports_it():
    # a rank-6 LoRA whose delta has the known spectrum above
    w = known_spectrum([4.0, 3.0, 2.0, 1.0, 0.5, 0.2]).float()
    up, down = svd_lowrank_factors(w, 6)
    mod = LoraModule.from_updown("m", down * 2, up, alpha=3.0)  # scale 0.5 undoes the factor 2
    new, stat = resize_module(mod, "energy", 0.9)
    assert stat.new_rank == 3 and new.rank == 3
    assert stat.energy_kept == pytest.approx(29 / 30.29, rel=1e-4)
    expected = w.double() - known_spectrum([0, 0, 0, 1.0, 0.5, 0.2])  # same U, V: drop the tail
    assert torch.allclose(reference_delta(new), expected, atol=1e-4)
    assert new.alpha == pytest.approx(1.5)  # ratio 0.5 kept
    assert stat.rel_error == pytest.approx((1.29 / 30.29) ** 0.5, rel=1e-3)
    assert torch.allclose(module_spectrum(mod), torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.2]), atol=1e-4)


def test_resize_of_full_diff_module():
    w = known_spectrum([3.0, 2.0, 0.001]).float()
    mod = LoraModule("m", "full", {"diff": w})
    new, stat = resize_module(mod, "ratio", 100)
    assert stat.new_rank == 2 and new.kind == "lora" and new.scale == 1.0
    assert torch.allclose(reference_delta(new).float(), w, atol=2e-3)


# ----------------------------------------------------------------------------- merges
@pytest.mark.parametrize("conv", [False, True])
def test_concat_merge_equals_the_sum_of_deltas(conv):
    a = lora("m", 12, 10, 4, 2.0, conv=conv, seed=1)
    b = lora("m", 12, 10, 6, None, conv=conv, seed=2)
    merged = concat_merge([(a, 0.8), (b, -0.5)])
    assert merged.rank == 10 and merged.kind == ("locon" if conv else "lora")
    expected = 0.8 * reference_delta(a) - 0.5 * reference_delta(b)
    assert torch.allclose(reference_delta(merged), expected, atol=1e-4)
    # averaging up and down separately (the wrong way) would not give the sum
    if not conv:
        wrong = (a.tensors["lora_up.weight"][:, :4] + b.tensors["lora_up.weight"][:, :4]) @ \
                (a.tensors["lora_down.weight"][:4] + b.tensors["lora_down.weight"][:4]) / 4
        assert not torch.allclose(wrong.double(), expected, atol=1e-2)


def test_concat_merge_refuses_mismatched_shapes():
    with pytest.raises(LoraFormatError, match="different shapes"):
        concat_merge([(lora("m", 12, 10, 4, None), 1.0), (lora("m", 12, 11, 4, None), 1.0)])


def test_svd_merge_at_full_rank_equals_the_sum_and_truncates_below():
    a, b = lora("m", 16, 14, 3, 1.0, seed=3), lora("m", 16, 14, 2, 4.0, seed=4)
    expected = reference_delta(a) * 1.0 + reference_delta(b) * 0.7
    merged, stat = svd_merge([(a, 1.0), (b, 0.7)], "fixed", 5)
    assert stat.old_rank == 5 and stat.new_rank == 5 and stat.energy_kept == pytest.approx(1.0)
    assert torch.allclose(reference_delta(merged), expected, atol=1e-4)
    small, st2 = svd_merge([(a, 1.0), (b, 0.7)], "fixed", 2)
    ref_s = torch.linalg.svdvals(expected)
    assert torch.linalg.norm(reference_delta(small) - expected) == pytest.approx(float(ref_s[2:].norm()), rel=1e-3)
    assert st2.energy_kept == pytest.approx(float(ref_s[:2].pow(2).sum() / ref_s.pow(2).sum()), rel=1e-4)


# ----------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("shape", [(20, 16), (8, 6, 3, 3)])
def test_extract_recovers_a_known_low_rank_delta(shape):
    base = torch.randn(*shape)
    up_true = torch.randn(shape[0], 3)
    down_true = torch.randn(3, int(torch.tensor(shape[1:]).prod()))
    delta = (up_true @ down_true).reshape(shape) * 0.1
    mod, stat = extract_delta(base + delta, base, "energy", 0.9999)
    assert stat.new_rank == 3 and stat.energy_kept > 0.9999
    assert torch.allclose(reference_delta(mod).float(), delta, atol=1e-4)
    assert torch.allclose(module_delta_full(mod), delta, atol=1e-4)


def test_summary_over_stats():
    a, sa = resize_module(lora("a", 8, 8, 4, None, seed=5), "fixed", 2)
    b, sb = resize_module(lora("b", 8, 8, 4, None, seed=6), "fixed", 3)
    summ = summarize([sa, sb])
    assert summ["modules"] == 2 and summ["new_rank_min"] == 2 and summ["new_rank_max"] == 3
    assert summ["energy_kept_min"] == pytest.approx(min(sa.energy_kept, sb.energy_kept))
    assert min(sa.energy_kept, sb.energy_kept) <= summ["energy_kept_overall"] <= max(sa.energy_kept, sb.energy_kept)


# ----------------------------------------------------------------------------- LyCORIS kinds
def _loha(out, cols, r1, r2, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    t = {"hada_w1_a": torch.randn(out, r1, generator=g), "hada_w1_b": torch.randn(r1, cols, generator=g),
         "hada_w2_a": torch.randn(out, r2, generator=g), "hada_w2_b": torch.randn(r2, cols, generator=g)}
    return LoraModule("h", "loha", t, alpha, r1)


def _lokr(seed, whole_w1=True, conv=False):
    g = torch.Generator().manual_seed(seed)
    t = {"lokr_w1": torch.randn(4, 2, generator=g)} if whole_w1 else \
        {"lokr_w1_a": torch.randn(4, 2, generator=g), "lokr_w1_b": torch.randn(2, 3, generator=g)}
    t["lokr_w2_a"] = torch.randn(5, 2, generator=g)
    t["lokr_w2_b"] = torch.randn(2, 6 * (9 if conv else 1), generator=g)
    return LoraModule("k", "lokr", t, 2.0, 2)


@pytest.mark.parametrize("make", [lambda: _loha(12, 10, 2, 3, 1.0, 7), lambda: _lokr(8), lambda: _lokr(9, False),
                                  lambda: _lokr(10, conv=True)], ids=["loha", "lokr", "lokr-ab", "lokr-conv"])
def test_lycoris_kinds_resize_and_merge_exactly_through_their_factors(make):
    from lora_studio.lora import math as lora_math

    mod = make()
    ref = lora_math.raw_delta(mod).double()  # the other implementation of the LyCORIS formulas
    assert torch.allclose(module_delta_full(mod).double(), ref, atol=1e-4)
    full_rank = int(torch.linalg.matrix_rank(ref.flatten(1), rtol=1e-5))  # fp32 noise is not rank
    spectrum = module_spectrum(mod)
    assert torch.allclose(spectrum[:full_rank].double(), torch.linalg.svdvals(ref.flatten(1))[:full_rank], rtol=1e-4)
    new, stat = resize_module(mod, "energy", 1.0)
    assert new.kind in ("lora", "locon") and stat.new_rank == full_rank
    assert torch.allclose(reference_delta(new).flatten(1), ref.flatten(1), atol=1e-3)
    plain = lora("x", ref.shape[0], ref.flatten(1).shape[1], 2, None, seed=11)
    merged = concat_merge([(mod, 0.5), (plain, 2.0)])
    want = 0.5 * ref.flatten(1) + 2.0 * reference_delta(plain)
    assert torch.allclose(reference_delta(merged).flatten(1), want, atol=1e-3)


def test_loha_conv_uses_the_given_kernel_shape_and_dora_is_refused():
    mod = _loha(8, 6 * 9, 2, 2, 2.0, 12)
    mod.extra["weight_shape"] = (8, 6, 3, 3)
    new, _ = resize_module(mod, "fixed", 4)
    assert new.tensors["lora_down.weight"].shape == (4, 6, 3, 3)
    assert new.tensors["lora_up.weight"].shape == (8, 4, 1, 1)
    dora = lora("d", 8, 6, 2, None)
    dora.tensors["dora_scale"] = torch.ones(1, 6)
    with pytest.raises(LoraFormatError, match="DoRA"):
        resize_module(dora, "fixed", 1)

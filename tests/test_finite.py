"""The fast finiteness test against the exact elementwise one, including the cases where its sum overflows."""

from __future__ import annotations

import pytest
import torch

from lora_studio.finite import all_finite, nonfinite_names

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_bad_element_anywhere_is_found(dtype, bad):
    t = torch.randn(3, 1001, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(t)
    for where in (0, 1500, t.numel() - 1):
        u = t.clone()
        u.view(-1)[where] = bad
        assert not all_finite(u) and not bool(torch.isfinite(u).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_values_whose_sum_overflows_are_still_finite(dtype):
    big = torch.full((64,), 3.0e38).to(dtype)
    assert not bool(torch.isfinite(big.sum(dtype=torch.float32)))  # the fast sum alone would call it bad
    assert all_finite(big)
    big[7] = float("nan")
    assert not all_finite(big)


def test_opposite_infinities_and_other_dtypes():
    assert not all_finite(torch.tensor([float("inf"), -float("inf"), 1.0]))  # inf + -inf is nan: still caught
    assert all_finite(torch.zeros(0)) and all_finite(torch.arange(5)) and all_finite(torch.tensor([True]))
    assert all_finite(torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn))
    assert not all_finite(torch.tensor([float("nan"), 1.0]).to(torch.float8_e4m3fn))  # no isfinite kernel there
    assert not all_finite(torch.tensor([complex(float("nan"), 0.0)]))


def test_nonfinite_names_lists_only_the_bad_ones_in_order():
    good, bad = torch.ones(3), torch.tensor([1.0, float("nan")])
    assert nonfinite_names([("a", bad), ("b", good), ("c", bad.half())]) == ["a", "c"]

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


def test_refuse_nonfinite_names_the_key_and_tells_an_overflow_from_a_broken_value():
    from lora_studio.errors import ExportError
    from lora_studio.finite import refuse_nonfinite

    ok, big = torch.ones(3), torch.full((3,), 1e5)
    refuse_nonfinite([("a", ok)], "out.safetensors", "Do this")  # nothing to refuse
    with pytest.raises(ExportError) as info:
        refuse_nonfinite([("a", ok), ("b", big.half()), ("c", big.half())], "out.safetensors", "Do this",
                         {"b": big, "c": big})
    msg = str(info.value)
    assert "out.safetensors" in msg and "b holds NaN or inf" in msg and "(and 1 more tensors)" in msg
    assert "overflow float16, whose largest value is 65504" in msg and msg.endswith("Do this; nothing was written.")
    broken = torch.tensor([float("nan"), 1.0])
    with pytest.raises(ExportError) as info:
        refuse_nonfinite([("n", broken.half())], "out.safetensors", "Do this", {"n": broken})
    assert "n holds NaN or inf." in str(info.value) and "overflow" not in str(info.value)


def _huge_alpha_file(folder):
    import bad_inputs as B

    return B.huge_alpha(folder)


def _merge_cli(tmp_path, out, dtype):
    from lora_studio.cli.main import main

    return main(["export", "--as-lora", "--lora", str(_huge_alpha_file(tmp_path)), "--out", str(out),
                 "--dtype", dtype])


def _resize(tmp_path, out, dtype):
    from lora_studio.export import resize_lora

    return resize_lora(_huge_alpha_file(tmp_path), out, "fixed", 1, dtype=dtype)


def _extract(tmp_path, out, dtype):
    from lora_studio.demo import random_demo_pipeline
    from lora_studio.export import extract_lora

    base, tuned = random_demo_pipeline(0), random_demo_pipeline(0)
    with torch.no_grad():  # a rank-1 change of 1e12 per element: its factors are fine in fp32, not in fp16
        tuned.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.add_(1e12)
    return extract_lora(tuned, base, out, "fixed", 1, dtype=dtype)


def _trainer(tmp_path, out, dtype):
    from lora_studio.lora.formats import LoraModule
    from lora_studio.train.save import write_lora

    mod = LoraModule.from_updown("lora_unet_x_to_q", torch.full((2, 8), 1e5), torch.full((8, 2), 1e-5), 2.0)
    return write_lora({mod.name: mod}, out, {}, dtype)


@pytest.mark.parametrize("write", [_merge_cli, _resize, _extract, _trainer])
def test_every_lora_writer_refuses_values_that_overflow_the_chosen_dtype(write, tmp_path, capsys):
    """Values finite in fp32 but beyond fp16 (an alpha of 3e38, a delta of 1e6) are refused after the cast, with
    the key named and a wider dtype suggested; nothing is written. In fp32 the same file is written and reads."""
    from lora_studio.errors import ExportError
    from lora_studio.lora.formats import read_lora

    out = tmp_path / "out.safetensors"
    try:
        result = write(tmp_path, out, "fp16")
    except ExportError as err:
        msg = str(err)
    else:
        assert result == 2, f"not refused: {result}"  # the CLI's exit status for an error the user can fix
        msg = capsys.readouterr().err
    assert "lora_" in msg and "holds NaN or inf after the conversion to float16" in msg, msg
    assert "overflow float16" in msg and "fp32 or bf16" in msg and "nothing was written" in msg, msg
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    write(tmp_path, out, "fp32")
    assert read_lora(out).modules

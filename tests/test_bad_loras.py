"""LoRA files that read as safetensors but are wrong as LoRAs: unknown keys, shapes of another model, another
family, NaN/inf, rank 0, missing halves, factors that do not fit. Each is refused with a message that names
the problem, by the reader or (for what only a base model can tell) by ``LoraMixer.add``; nothing is applied."""

from __future__ import annotations

import pytest
import torch

import bad_inputs as B
from lora_factories import demo_or_random_pipeline, write_kohya_lora, write_kohya_sdxl_lora, write_sdxl_lora
from lora_studio.errors import ExportError, FamilyMismatchError, LoraFormatError, LoraStudioError
from lora_studio.family import Family
from lora_studio.lora.formats import LoraFile, LoraModule, read_lora
from lora_studio.lora.inspect import inspect_lora
from lora_studio.mix import LoraMixer


@pytest.fixture(scope="module")
def pipe():
    return demo_or_random_pipeline()


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def _same(before: dict[str, torch.Tensor], pipe) -> bool:
    after = pipe.unet.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", B.LORA_CASES)
def test_bad_lora_is_refused_by_the_mixer(case, tmp_path, pipe):
    build, words = B.LORA_CASES[case]
    path = build(tmp_path)
    before = _weights(pipe)
    mixer = LoraMixer(pipe)
    with pytest.raises(LoraStudioError) as info:
        mixer.add(path)
        mixer.apply()  # only a delta too large for its weight gets this far
    B.assert_helpful(info.value, words, path)
    assert _same(before, pipe)
    assert mixer.entries == [] or case in B.REFUSED_BY_APPLY
    for e in mixer.entries:
        mixer.remove(e.name)
    mixer.apply()
    assert _same(before, pipe)


@pytest.mark.parametrize("case", [c for c in B.LORA_CASES if c not in B.NEEDS_BASE_MODEL])
def test_bad_lora_content_is_refused_by_the_reader_and_reported_by_the_inspector(case, tmp_path):
    """Without a base model the reader already refuses all but what needs the model (the shape mismatch, a
    delta too large for the weight it changes); the inspector shows the header and says what is wrong instead."""
    build, words = B.LORA_CASES[case]
    path = build(tmp_path)
    with pytest.raises(LoraFormatError) as info:
        read_lora(path)
    B.assert_helpful(info.value, words, path)
    report = inspect_lora(path)
    assert report.problem == str(info.value)
    assert report.tensor_count > 0


def test_sdxl_lora_on_the_sd1_demo_names_both_families(tmp_path, pipe):
    path = write_sdxl_lora(tmp_path / "xl.safetensors")
    assert read_lora(path).family is Family.SDXL
    with pytest.raises(FamilyMismatchError) as info:
        LoraMixer(pipe).add(path)
    B.assert_helpful(info.value, (("SDXL",), ("SD 1.x",)))


def test_sd1_lora_on_an_sdxl_pipeline_names_both_families(tmp_path, pipe):
    from tiny_families import tiny_pipeline

    xl = tiny_pipeline(Family.SDXL)
    sd1 = write_kohya_lora(tmp_path / "sd1.safetensors", pipe)  # metadata says sd_v1
    with pytest.raises(FamilyMismatchError) as info:
        LoraMixer(xl).add(sd1)
    B.assert_helpful(info.value, (("SD 1.x",), ("SDXL",)))
    # without the metadata the family is unknown, and its names and shapes fit no SDXL layer
    t, _ = __import__("lora_studio.fileio", fromlist=["x"]).load_safetensors(sd1)
    bare = B.lora_file(tmp_path, "bare.safetensors", t)
    with pytest.raises(LoraStudioError) as info:
        LoraMixer(xl).add(bare)
    B.assert_helpful(info.value, (("match no layer", "do not fit"),))
    # control: an SDXL LoRA made for this pipeline is accepted
    ok = write_kohya_sdxl_lora(tmp_path / "ok.safetensors", xl)
    assert LoraMixer(xl).add(ok)


def test_nan_that_slips_past_the_reader_is_never_applied(pipe):
    """A LoraFile built in memory (no reader check) with a NaN: apply() refuses and leaves the weights as they were."""
    before = _weights(pipe)
    down = torch.full((2, 32), 0.1)
    up = torch.full((32, 2), float("nan"))
    lf = LoraFile(B.Path("mem.safetensors"), {B.MODULE: LoraModule.from_updown(B.MODULE, down, up, 2.0)}, {},
                  "kohya", None)
    mixer = LoraMixer(pipe)
    mixer.add(lf)
    with pytest.raises(ExportError) as info:
        mixer.apply()
    B.assert_helpful(info.value, (("out of",), ("lower the strengths",)))
    assert _same(before, pipe)


def test_overflowing_strength_is_refused_not_rendered(tmp_path, pipe):
    path = write_kohya_lora(tmp_path / "ok.safetensors", pipe)
    before = _weights(pipe)
    mixer = LoraMixer(pipe)
    mixer.add(path, strength=1e300)  # beyond float32: inf in every touched weight
    with pytest.raises(ExportError):
        mixer.apply()
    mixer.restore()
    assert _same(before, pipe)
    mixer.set_strength(mixer.entries[0].name, unet=0.5)  # the mixer keeps working after the error
    mixer.apply()
    assert not _same(before, pipe)
    mixer.restore()
    assert _same(before, pipe)

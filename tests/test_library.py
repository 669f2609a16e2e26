"""library.py: scanning a LoRA folder (a bad file becomes an item with an error, never a crash) and resolving names."""

from __future__ import annotations

import json

import pytest

from lora_factories import demo_or_random_pipeline, write_kohya_lora, write_loha
from lora_studio.errors import InputFileError
from lora_studio.library import available_names, resolve, scan_library


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    pipe = demo_or_random_pipeline()
    tags = {"10_stripes": {"stripes": 24, "a red circle": 6, "circle": 3}}
    write_kohya_lora(root / "stripes.safetensors", pipe, rank=4, alpha=2.0, te=False,
                     metadata={"ss_tag_frequency": json.dumps(tags)})
    write_loha(root / "styles" / "hatch.safetensors", pipe, rank=2)
    (root / "styles" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (root / "old.pt").write_bytes(b"pickle")
    (root / "readme.txt").write_text("not a LoRA")
    (root / ".hidden.safetensors").write_bytes(b"")
    return root


def test_scan_library_lists_every_file_and_survives_bad_ones(folder):
    items = {i.name: i for i in scan_library(folder)}
    assert sorted(items) == ["old", "stripes", "styles/broken", "styles/hatch"]
    good = items["stripes"]
    assert (good.error, good.family, good.rank) == (None, "sd1", 4)
    assert "LoRA" in good.kind
    assert good.trigger_words[:1] == ["stripes"]
    assert good.size == (folder / "stripes.safetensors").stat().st_size
    assert items["styles/hatch"].error is None and "LoHa" in items["styles/hatch"].kind
    assert items["styles/broken"].error and "broken.safetensors" in items["styles/broken"].error
    assert items["old"].error and "unpickling" in items["old"].error


def test_resolve_by_name_stem_case_and_path(folder):
    assert resolve("stripes", folder) == folder / "stripes.safetensors"
    assert resolve("styles/hatch", folder) == folder / "styles" / "hatch.safetensors"
    assert resolve("HATCH", folder) == folder / "styles" / "hatch.safetensors"
    assert resolve("stripes.safetensors", folder) == folder / "stripes.safetensors"
    assert resolve(str(folder / "styles" / "hatch.safetensors"), "/nonexistent") == folder / "styles" / "hatch.safetensors"
    assert available_names(folder) == ["stripes", "styles/broken", "styles/hatch"]


def test_resolve_errors_list_the_folder(folder, tmp_path):
    with pytest.raises(InputFileError) as err:
        resolve("dots", folder)
    assert "'dots'" in str(err.value) and "stripes, styles/broken, styles/hatch" in str(err.value)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "same.safetensors").write_bytes(b"x")
    (tmp_path / "b" / "same.safetensors").write_bytes(b"x")
    with pytest.raises(InputFileError, match="several files.*a/same, b/same"):
        resolve("same", tmp_path)
    with pytest.raises(InputFileError, match="does not exist"):
        scan_library(tmp_path / "missing")


def test_scan_real_lora_folder(real_loras):
    """Files made by other tools: the kohya/LyCORIS LoKr files list with their family, kind, rank and trigger
    words; the cloneofsimo-format files read as SD1 LoRAs; the FLUX file is listed with the reason it is refused
    instead of breaking the scan."""
    items = {i.name: i for i in scan_library(real_loras)}
    assert len(items) == 7
    for rank in (4, 8, 16):
        falcon = items[f"smart_falcon_{rank}_lokr"]
        assert (falcon.error, falcon.family, falcon.kind, falcon.rank) == (None, "sd1", "LoKr", rank)
        assert "smf girl" in falcon.trigger_words
    for name in ("lora_disney", "analog_svd_rank4"):
        assert (items[name].error, items[name].family, items[name].kind) == (None, "sd1", "LoRA")
    assert "FLUX" in items["flux_lora_mislabelled_sd15"].error

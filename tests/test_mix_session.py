"""MixSession (the GUI's per-session mix): the base loads once, each LoRA file is read once, and moving a
strength re-weights in memory; the result equals a fresh mixer at the same strengths."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_factories import demo_or_random_pipeline, write_kohya_lora
from lora_studio.errors import ConfigError
from lora_studio.mix import LoraMixer
from lora_studio.mix.args import parse_block_weights
from lora_studio.mix.session import MixSession, SlotSpec
from lora_studio.render import GenParams, render


@pytest.fixture()
def counted(lora_reads):
    """A session whose loader counts model loads, and a counter of LoRA file reads."""
    loads = []

    def loader(base):
        loads.append(base)
        return demo_or_random_pipeline()

    return MixSession(loader), loads, lora_reads


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_slider_moves_reload_nothing(counted, tmp_path):
    session, loads, reads = counted
    ref_pipe = demo_or_random_pipeline()
    a = write_kohya_lora(tmp_path / "a.safetensors", ref_pipe, rank=4, alpha=4.0, seed=1)
    b = write_kohya_lora(tmp_path / "b.safetensors", ref_pipe, rank=4, alpha=4.0, seed=2)
    params = GenParams("a red circle", steps=3, seed=0)
    first = session.compare("demo", [SlotSpec(str(a), 1.0), SlotSpec(str(b), 0.5)], params, tmp_path / "c1")
    assert first.labels == ["base", "a 1", "b 0.5", "mix"]
    assert (len(loads), reads["n"] > 0) == (1, True)
    reads_after_first = reads["n"]
    assert session.loads == 1 and session.reads == 2
    # move a slider, render again: no model load, no file read
    second = session.compare("demo", [SlotSpec(str(a), 0.25), SlotSpec(str(b), 0.5)], params, tmp_path / "c2")
    assert second.labels == ["base", "a 0.25", "b 0.5", "mix"]
    assert len(loads) == 1 and reads["n"] == reads_after_first and session.reads == 2
    assert not np.array_equal(_pixels(first.image_paths[1]), _pixels(second.image_paths[1]))
    np.testing.assert_array_equal(_pixels(first.image_paths[0]), _pixels(second.image_paths[0]))  # base untouched
    # the mix tile equals a fresh mixer at the same strengths on a fresh pipeline
    fresh = LoraMixer(ref_pipe)
    fresh.add(str(a), strength=0.25)
    fresh.add(str(b), strength=0.5)
    fresh.apply()
    reads_after_first = reads["n"]           # the reference mixer above read the files itself
    expected = np.asarray(render(ref_pipe, params).image.convert("RGB")).astype(int)
    assert np.abs(_pixels(second.image_paths[3]) - expected).max() <= 1
    # dropping a slot removes it; the same base keeps the pipeline
    third = session.compare("demo", [SlotSpec(str(b), 1.0)], params, tmp_path / "c3")
    assert third.labels == ["base", "b 1"] and [e.name for e in session.mixer.entries] == ["b"]
    assert len(loads) == 1 and reads["n"] == reads_after_first
    # an X/Y grid on the same session reads nothing either
    xy = session.xy("demo", [SlotSpec(str(b), 1.0)], params, "strength=0,1", "", tmp_path / "xy")
    assert len(xy.image_paths) == 2 and reads["n"] == reads_after_first and len(loads) == 1


def test_block_and_te_strengths_reach_the_mixer(counted, tmp_path):
    session, loads, _ = counted
    a = write_kohya_lora(tmp_path / "a.safetensors", demo_or_random_pipeline(), rank=4, alpha=4.0, seed=1)
    picked = session.set_loras("demo", [SlotSpec(str(a), 0.8, 0.3, {"down": 0.0, "up.1": 0.5})])
    assert picked == [("a", 0.8, 0.3)]
    entry = session.mixer.entries[0]
    assert (entry.strength, entry.te_strength, entry.block_weights) == (0.8, 0.3, {"down": 0.0, "up.1": 0.5})
    session.set_loras("demo", [SlotSpec(str(a), 0.5, None, {})])
    assert (entry.strength, entry.te_strength, entry.block_weights) == (0.5, None, {})
    session.use_base("other")          # a different base: a fresh pipeline and an empty mixer
    assert loads == ["demo", "other"] and session.mixer.entries == []
    with pytest.raises(ConfigError, match="twice"):
        session.set_loras("other", [SlotSpec(str(a)), SlotSpec(str(a))])
    with pytest.raises(ConfigError, match="empty"):
        session.compare("other", [], GenParams("x"), tmp_path)


def test_parse_block_weights():
    assert parse_block_weights("down=1, mid=0.5; up.1=0") == {"down": 1.0, "mid": 0.5, "up.1": 0.0}
    assert parse_block_weights("  ") == {}
    with pytest.raises(ConfigError, match="'mid'"):
        parse_block_weights("down=1, mid")


def test_model_hash_is_the_autov2_of_the_base_file_hashed_once(tmp_path, monkeypatch):
    import hashlib

    import lora_studio.mix.session as session_module
    from lora_studio.render import parse_infotext

    base = tmp_path / "my-model.safetensors"
    base.write_bytes(b"not really a checkpoint, the loader is faked" * 100)
    hashed = []
    real = session_module.file_sha256
    monkeypatch.setattr(session_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    session = MixSession(lambda source: demo_or_random_pipeline())
    session.set_loras(str(base), [])
    params = GenParams("a red circle", steps=1, sampler="DPM++ 2M Karras", model_name="my-model")
    first = parse_infotext(session.render(params).infotext)
    second = parse_infotext(session.render(params).infotext)
    assert first["model_hash"] == second["model_hash"] == hashlib.sha256(base.read_bytes()).hexdigest()[:10]
    assert len(hashed) == 1
    assert first["sampler"] == "DPM++ 2M Karras"
    session.set_loras("demo", [])
    assert "Model hash" not in session.render(params).infotext

"""render.py: A1111 infotext (format and round trip), PNG "parameters" chunk + JSON sidecar, the sampler table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_studio.errors import ConfigError
from lora_studio.render import (SAMPLERS, GenParams, infotext, lora_hash, make_scheduler, params_from_infotext,
                                 parse_infotext, read_png_parameters, render, save_png)


@pytest.fixture()
def pipe():
    """The shipped demo model once it exists; its untrained twin before (same architecture)."""
    from lora_studio import demo

    if (demo.DEMO_MODEL_DIR / "model_index.json").exists():
        return demo.load_demo_pipeline()
    return demo.random_demo_pipeline()


def test_infotext_matches_a1111_layout():
    p = GenParams("a red circle", negative_prompt="blurry", steps=20, cfg=4.0, seed=0, model_name="demo")
    text = infotext(p, [("stripes", 0.8), ("dots", 0.5, 0.25)])
    assert text.split("\n") == [
        "a red circle <lora:stripes:0.8> <lora:dots:0.25:0.5>",   # A1111 order: te first, then unet
        "Negative prompt: blurry",
        "Steps: 20, Sampler: DDIM, CFG scale: 4.0, Seed: 0, Size: 64x64, Model: demo",
    ]
    # no negative prompt: no line for it (A1111 leaves it out)
    assert infotext(GenParams("x"), []).split("\n")[1].startswith("Steps: 20, ")
    # A1111 writes "Clip skip" after the model, and only when it is not 1
    assert infotext(GenParams("x", clip_skip=2)).split("\n")[1] == (
        "Steps: 20, Sampler: DDIM, CFG scale: 4.0, Seed: 0, Size: 64x64, Model: demo, Clip skip: 2")
    # values with commas or colons are JSON-quoted, as A1111's quote() does
    assert 'Model: "C:\\\\models\\\\a,b"' in infotext(GenParams("x", model_name="C:\\models\\a,b"))


@pytest.mark.parametrize("params, loras", [
    (GenParams("a red circle"), []),
    (GenParams("a blue square, simple", negative_prompt="noise, text", steps=7, cfg=7.5, seed=123456789,
               width=128, height=96, sampler="DPM++ 2M Karras", model_name="sd15/model: v1", model_hash="0123abcdef"),
     [("a", 1.0)]),
    (GenParams("a (red:1.3) circle BREAK [square]", clip_skip=2), []),
    (GenParams("multi\nline prompt", negative_prompt="two\nlines", sampler="Euler a"),
     [("style/stripes", -0.5), ("b", 0.3, 0.7), ("c", 0.123456789)]),
])
def test_infotext_round_trip(params, loras):
    text = infotext(params, loras)
    back, back_loras = params_from_infotext(text)
    assert back == params
    assert [(n, s, t) for n, s, t in back_loras] == [(x[0], x[1], x[2] if len(x) > 2 else None) for x in loras]


def test_parse_reads_new_a1111_schedule_field_and_keeps_unknown_fields():
    text = ("girl, <lora:x:0.6>\nNegative prompt: bad\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 7, Seed: 42, Size: 512x768, Model hash: abc123, Model: sd15, "
            'Lora hashes: "x: 1234abcd", Version: v1.10.1')
    d = parse_infotext(text)
    assert (d["prompt"], d["negative_prompt"], d["steps"], d["cfg"], d["seed"]) == ("girl", "bad", 30, 7.0, 42)
    assert (d["sampler"], d["width"], d["height"], d["model_name"]) == ("DPM++ 2M Karras", 512, 768, "sd15")
    assert d["loras"] == [("x", 0.6, None)]
    assert d["model_hash"] == "abc123"
    assert d["extra"] == {"Lora hashes": "x: 1234abcd", "Version": "v1.10.1"}
    # files written before A1111 1.9 keep the schedule in the sampler's name, and are still read
    assert parse_infotext("x\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1")["sampler"] == "DPM++ 2M Karras"


def test_infotext_writes_a1111_19_schedule_type_and_model_hash():
    p = GenParams("x", sampler="DPM++ 2M Karras", model_name="v1-5", model_hash="6ce0161689")
    assert infotext(p).split("\n")[1] == ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.0, "
                                          "Seed: 0, Size: 64x64, Model hash: 6ce0161689, Model: v1-5")
    assert infotext(GenParams("x", sampler="Euler a")).split("\n")[1].startswith("Steps: 20, Sampler: Euler a, CFG")


def test_text_without_parameter_line_is_all_prompt():
    d = parse_infotext("just a prompt, with commas")
    assert d["prompt"] == "just a prompt, with commas" and "steps" not in d


def _demo_scheduler_config():
    from diffusers import DDIMScheduler

    from lora_studio.demo import SCHEDULER_CONFIG

    return DDIMScheduler(**SCHEDULER_CONFIG).config


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_table_builds_the_named_scheduler(name):
    base = _demo_scheduler_config()
    cls_name, extra = SAMPLERS[name]
    sched = make_scheduler(name, base)
    assert type(sched).__name__ == cls_name
    for key, value in extra.items():
        assert sched.config[key] == value
    assert sched.config.get("use_karras_sigmas", False) == ("Karras" in name)
    assert sched.config.num_train_timesteps == base.num_train_timesteps
    assert sched.config.beta_schedule == base.beta_schedule


@pytest.mark.slow
def test_every_sampler_renders(pipe):
    """Each table entry runs through the pipeline at few steps (PNDM, for one, needs skip_prk_steps for that)."""
    pictures = {name: np.asarray(render(pipe, GenParams("a red circle", steps=2, width=32, height=32,
                                                        sampler=name)).image) for name in SAMPLERS}
    assert all(p.shape == (32, 32, 3) for p in pictures.values())
    assert not np.array_equal(pictures["DDIM"], pictures["Euler a"])


def test_karras_choice_does_not_leak_into_the_next_sampler():
    karras = make_scheduler("DPM++ 2M Karras", _demo_scheduler_config())
    plain = make_scheduler("DPM++ 2M", karras.config)
    assert plain.config.use_karras_sigmas is False
    sde = make_scheduler("DPM++ 2M SDE", _demo_scheduler_config())
    assert make_scheduler("DPM++ 2M", sde.config).config.algorithm_type == "dpmsolver++"


def test_a_sampler_whose_package_is_missing_is_refused_and_requirements_name_it(monkeypatch):
    import re
    import sys

    from lora_studio import render

    needed = set(render._NEEDS_PACKAGE.values())
    assert needed >= {"scipy"}                                     # diffusers' LMS integrates with scipy
    reqs = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text()
    named = {re.split(r"[<>=!~\[; ]", line.strip())[0].lower() for line in reqs.splitlines()
             if line.strip() and not line.lstrip().startswith("#")}
    assert needed <= named, f"requirements.txt lacks {needed - named}"
    monkeypatch.setitem(sys.modules, "scipy", None)                # as on an install without scipy
    for name in ("LMS", "LMS Karras"):
        with pytest.raises(ConfigError, match=r"needs the scipy package.*pip install scipy"):
            make_scheduler(name, _demo_scheduler_config())
    make_scheduler("DPM++ 2M Karras", _demo_scheduler_config())    # the others need nothing more


def test_unknown_sampler_lists_choices():
    with pytest.raises(ConfigError) as err:
        GenParams("x", sampler="Euler b").check()
    assert "Euler b" in str(err.value) and "DPM++ 2M Karras" in str(err.value)
    assert GenParams("x", sampler="euler  A").check().sampler == "Euler a"


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=2.5), dict(width=60), dict(height=0),
                                 dict(cfg=float("nan")), dict(cfg="high")])
def test_bad_params_are_config_errors(bad):
    with pytest.raises(ConfigError):
        GenParams("x", **bad).check()


def test_render_is_seeded_uses_the_sampler_and_restores_the_scheduler(pipe):
    original = pipe.scheduler
    events = []
    a = render(pipe, GenParams("a red circle", steps=2, seed=1), progress=events.append)
    assert [(e.stage, e.current, e.total) for e in events] == [("render", 1, 2), ("render", 2, 2)]
    b = render(pipe, GenParams("a red circle", steps=2, seed=1))
    c = render(pipe, GenParams("a red circle", steps=2, seed=2))
    d = render(pipe, GenParams("a red circle", steps=2, seed=1, sampler="Euler a"))
    assert pipe.scheduler is original
    arr = [np.asarray(r.image) for r in (a, b, c, d)]
    assert a.image.size == (64, 64)
    assert np.array_equal(arr[0], arr[1])
    assert not np.array_equal(arr[0], arr[2])
    assert not np.array_equal(arr[0], arr[3])
    # A random seed (-1) is replaced by the one used, so the picture can be made again
    r = render(pipe, GenParams("a red circle", steps=2, seed=-1))
    assert r.params.seed >= 0 and f"Seed: {r.params.seed}," in r.infotext


def test_lora_tags_in_the_prompt_do_not_reach_the_text_encoder(pipe):
    plain = render(pipe, GenParams("a red circle", steps=2))
    tagged = render(pipe, GenParams("a red circle <lora:whatever:0.5>", steps=2))
    assert np.array_equal(np.asarray(plain.image), np.asarray(tagged.image))


def test_save_png_writes_parameters_chunk_and_sidecar(pipe, tmp_path):
    r = render(pipe, GenParams("a red circle", negative_prompt="blue", steps=2, seed=5), [("stripes", 0.75)])
    path = save_png(r, tmp_path / "out" / "img.png")
    assert path.exists() and not list(path.parent.glob("*.part"))
    assert read_png_parameters(path) == r.infotext
    with Image.open(path) as im:
        assert im.format == "PNG" and im.text["parameters"] == r.infotext
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(r.image.convert("RGB")))
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["parameters"] == r.infotext
    assert (side["prompt"], side["negative_prompt"], side["seed"], side["steps"]) == ("a red circle", "blue", 5, 2)
    assert side["loras"] == [{"name": "stripes", "strength": 0.75, "te_strength": None}]
    assert parse_infotext(side["parameters"])["loras"] == [("stripes", 0.75, None)]


def test_lora_hash_is_a1111_short_hash_of_the_tensor_data(tmp_path):
    """A1111 / kohya "addnet" hash: SHA-256 of the bytes after the safetensors header, 12 hex digits; so a
    metadata edit keeps the hash and a weight edit changes it."""
    import hashlib
    import struct

    import torch
    from safetensors.torch import save_file

    t = {"lora_unet_x.lora_down.weight": torch.arange(8.0).reshape(2, 4)}
    save_file(t, str(tmp_path / "a.safetensors"), metadata={"ss_output_name": "a"})
    save_file(t, str(tmp_path / "b.safetensors"), metadata={"ss_output_name": "a much longer name", "x": "y"})
    save_file({k: v + 1 for k, v in t.items()}, str(tmp_path / "c.safetensors"))
    raw = (tmp_path / "a.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert lora_hash(tmp_path / "a.safetensors") == hashlib.sha256(raw[8 + n:]).hexdigest()[:12]
    assert lora_hash(tmp_path / "a.safetensors") == lora_hash(tmp_path / "b.safetensors")
    assert lora_hash(tmp_path / "a.safetensors") != lora_hash(tmp_path / "c.safetensors")


def test_render_writes_lora_hashes_field(pipe):
    r = render(pipe, GenParams("a red circle", steps=1, width=32, height=32), [("a", 0.5), ("b", 1.0)],
               lora_hashes={"a": "0123456789ab", "b": "ba9876543210", "unused": "ffffffffffff"})
    assert r.infotext.endswith('Lora hashes: "a: 0123456789ab, b: ba9876543210"')
    assert parse_infotext(r.infotext)["extra"]["Lora hashes"] == "a: 0123456789ab, b: ba9876543210"

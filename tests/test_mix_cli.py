"""Mixing presets (JSON <-> dataclass, unknown keys named) and `python -m lora_studio mix` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lora_factories import demo_or_random_pipeline, write_kohya_lora
from lora_studio.cli.main import main
from lora_studio.mix.args import parse_blocks_arg, parse_lora_arg
from lora_studio.errors import ConfigError
from lora_studio.mix.presets import (PRESETS_DIR, MixPreset, PresetLora, load_mix_preset, preset_slots,
                                    preset_from_dict, save_mix_preset)
from lora_studio.render import lora_hash, parse_infotext, read_png_parameters


@pytest.mark.parametrize("text, expected", [
    ("a.safetensors", ("a.safetensors", 1.0, None)),
    ("a.safetensors:0.8", ("a.safetensors", 0.8, None)),
    ("a.safetensors:-0.5:0.25", ("a.safetensors", -0.5, 0.25)),
    ("C:\\loras\\x.safetensors:1e-1", ("C:\\loras\\x.safetensors", 0.1, None)),
    ("name_only:.5", ("name_only", 0.5, None)),
])
def test_parse_lora_arg(text, expected):
    assert parse_lora_arg(text) == expected


def test_parse_blocks_arg():
    assert parse_blocks_arg("my:lora:down=0, up.1=0.5") == ("my:lora", {"down": 0.0, "up.1": 0.5})
    for bad in ("down=0", "x:down", "x:=1", "x:down=high"):
        with pytest.raises(ConfigError, match="NAME:KEY=WEIGHT"):
            parse_blocks_arg(bad)


def test_shipped_demo_preset_loads():
    preset, path = load_mix_preset("mix-demo")
    assert path == PRESETS_DIR / "mix-demo.json"
    assert [(lo.file, lo.strength, lo.te_strength) for lo in preset.loras] == [
        ("stripes.safetensors", 0.8, None), ("dots.safetensors", 0.5, 0.3)]
    assert preset.loras[1].blocks == {"down": 1.0, "mid": 0.5, "up": 1.0}
    assert preset.gen_params().prompt == "a red circle"


@pytest.mark.parametrize("data, words", [
    ({"lora": []}, ["'lora'", "Known keys"]),
    ({"loras": [{"file": "a", "strenght": 1}]}, ["loras[0]", "'strenght'"]),
    ({"loras": [{"strength": 1}]}, ["loras[0]", "\"file\""]),
    ({"loras": [{"file": "a", "strength": "high"}]}, ["loras[0].strength", "'high'"]),
    ({"steps": 2.5}, ["steps", "whole number"]),
    ({"sampler": "Nope"}, ["unknown sampler 'Nope'"]),
    ({"width": 65}, ["multiple of 8"]),
])
def test_bad_presets_name_the_key(data, words):
    with pytest.raises(ConfigError) as err:
        preset_from_dict(data)
    for w in words:
        assert w in str(err.value)


def test_preset_save_load_round_trip(tmp_path):
    preset = MixPreset([PresetLora("a.safetensors", 0.7, 0.2, {"up": 0.5}, "styleA"), PresetLora("b.safetensors")],
                       prompt="a blue square", steps=3, cfg=5.5, seed=9, sampler="Euler a", lora_dir="loras")
    path = save_mix_preset(preset, tmp_path / "mix-mine.json")
    raw = json.loads(path.read_text())
    assert raw["loras"][1] == {"file": "b.safetensors", "strength": 1.0}
    assert load_mix_preset(path)[0] == preset


def test_preset_loras_resolve_beside_the_preset_and_in_lora_dir(tmp_path):
    from lora_studio.mix.session import MixSession

    pipe = demo_or_random_pipeline()
    write_kohya_lora(tmp_path / "p" / "near.safetensors", pipe, seed=1)
    write_kohya_lora(tmp_path / "p" / "loras" / "far.safetensors", pipe, seed=2)
    preset = preset_from_dict({"lora_dir": "loras", "loras": [
        {"file": "near.safetensors", "strength": 0.5},
        {"file": "far", "strength": -1, "te_strength": 0, "blocks": {"mid": 0}}]})
    session = MixSession(loader=lambda base: pipe)
    names = [n for n, _, _ in session.set_loras("demo", preset_slots(preset, preset_dir=tmp_path / "p"))]
    got = {e.name: (e.strength, e.te_strength, e.block_weights) for e in session.mixer.entries}
    assert names == ["near", "far"]
    assert got == {"near": (0.5, None, {}), "far": (-1.0, 0.0, {"mid": 0.0})}
    with pytest.raises(Exception, match="not found; looked at") as err:
        preset_slots(preset_from_dict({"loras": ["missing.safetensors"]}), preset_dir=tmp_path)
    assert "set \"lora_dir\" in the preset" in str(err.value)
    # a preset that sets lora_dir is shown the folders searched, not told to set it
    with pytest.raises(Exception, match="not found; looked at") as err:
        preset_slots(preset_from_dict({"lora_dir": "loras", "loras": ["missing.safetensors"]}),
                     preset_dir=tmp_path / "p")
    assert str(tmp_path / "p" / "loras" / "missing.safetensors") in str(err.value)
    assert "Set \"lora_dir\"" not in str(err.value) and "put the file in" in str(err.value)
    with pytest.raises(Exception, match="not found; looked at") as err:
        preset_slots(preset_from_dict({"lora_dir": "nowhere", "loras": ["missing.safetensors"]}),
                     preset_dir=tmp_path / "p")
    assert "nowhere" in str(err.value) and "does not exist" in str(err.value)


@pytest.fixture()
def base_loader(monkeypatch):
    """The CLI's model loader, counted; the demo model (or its random twin before its weights ship)."""
    import lora_studio.cli.mix as cli_mix

    calls = []

    def load(source, allow_pickle=False):
        calls.append(source)
        return demo_or_random_pipeline()

    monkeypatch.setattr(cli_mix, "load_base", load)
    return calls


def test_cli_mix_renders_grid_xy_and_saves_preset(tmp_path, base_loader, capsys):
    pipe = demo_or_random_pipeline()
    a = write_kohya_lora(tmp_path / "loras" / "alpha.safetensors", pipe, alpha=4.0, seed=1)
    write_kohya_lora(tmp_path / "loras" / "beta.safetensors", pipe, alpha=4.0, seed=2)
    out = tmp_path / "out"
    rc = main(["mix", "--base", "demo", "--lora", f"{a}:3", "--prompt", "a red circle <lora:beta:0.5>",
               "--lora-dir", str(tmp_path / "loras"), "--steps", "2", "--width", "32", "--height", "32",
               "--seed", "4", "--blocks", "alpha:down=0,mid=0.5", "--grid", "--xy", "strength=0,1", "--xy", "seed=1,2", "--out", str(out),
               "--save-preset", str(tmp_path / "mix-saved.json")])
    printed = capsys.readouterr().out
    assert rc == 0 and base_loader == ["demo"]
    assert "alpha" in printed and "beta" in printed and "modules matched" in printed
    assert "blocks down=0, mid=0.5" in printed
    image = out / "00000-4.png"
    info = parse_infotext(read_png_parameters(image))
    assert info["loras"] == [("alpha", 3.0, None), ("beta", 0.5, None)]
    hashes = f"alpha: {lora_hash(a)}, beta: {lora_hash(tmp_path / 'loras' / 'beta.safetensors')}"
    assert info["extra"]["Lora hashes"] == hashes
    assert (info["prompt"], info["steps"], info["seed"], info["width"]) == ("a red circle", 2, 4, 32)
    tiles = sorted(out.glob("compare-0*.png"))
    assert [t.name for t in tiles] == ["compare-00-base.png", "compare-01-alpha_3.png", "compare-02-beta_0.5.png",
                                       "compare-03-mix.png"]
    with Image.open(image) as im, Image.open(tiles[3]) as mix:
        assert np.array_equal(np.asarray(im), np.asarray(mix))   # the mix tile is the rendered mix
    assert (out / "compare-grid.png").exists() and (out / "xy-grid.png").exists()
    assert len(list((out / "xy-cells").glob("*.png"))) == 4
    saved, _ = load_mix_preset(tmp_path / "mix-saved.json")
    assert saved.loras[0].blocks == {"down": 0.0, "mid": 0.5}
    assert saved.prompt == "a red circle"       # the tag became a 'loras' entry, not a second dose
    assert [(lo.file, lo.strength) for lo in saved.loras] == [(str(a), 3.0), (str(tmp_path / "loras" / "beta.safetensors"), 0.5)]
    # a second run numbers its image after the first instead of overwriting it
    assert main(["mix", "--preset", str(tmp_path / "mix-saved.json"), "--steps", "1", "--out", str(out)]) == 0
    assert (out / "00001-4.png").exists()


def test_cli_mix_user_errors_exit_2_before_loading_the_model(tmp_path, base_loader, capsys):
    (tmp_path / "loras").mkdir()
    write_kohya_lora(tmp_path / "loras" / "alpha.safetensors", demo_or_random_pipeline())
    cases = [
        (["--prompt", "x <lora:nope:1>", "--lora-dir", str(tmp_path / "loras")], "no LoRA named 'nope'"),
        (["--prompt", "x", "--sampler", "Bogus"], "unknown sampler"),
        (["--prompt", "x", "--grid"], "need at least one LoRA"),
        (["--prompt", "x", "--xy", "size=1,2"], "unknown grid axis"),
        (["--lora", "alpha"], "no prompt"),
        (["--prompt", "x", "--preset", str(tmp_path / "none.json")], "not found"),
        (["--prompt", "x", "--lora", f"{tmp_path / 'loras' / 'alpha.safetensors'}:nan"], "'nan' is not a number"),
        (["--prompt", "x", "--lora", f"{tmp_path / 'loras' / 'alpha.safetensors'}:abc"], "'abc' is not a number"),
        (["--prompt", "x", "--lora", "alpha:0.5:xyz"], "'xyz' is not a number"),
        (["--prompt", "x", "--lora", str(tmp_path / "gone.safetensors")], f"no such file: {tmp_path / 'gone'}"),
        (["--prompt", "x", "--lora", "gone.safetensors:0.5", "--lora-dir", str(tmp_path / "loras")],
         "no such file"),
        (["--prompt", "x", "--lora", "alpha"], "no --lora-dir to look the name up in"),
        (["--prompt", "x", "--lora", str(tmp_path / "loras")], "is a folder, not a LoRA file"),
    ]
    for argv, message in cases:
        assert main(["mix", "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        if message == "no LoRA named 'nope'":
            assert "alpha" in err   # the error lists what the folder holds
    assert base_loader == []


def _a1111_png(path, text):
    """A picture as A1111 saves it: the infotext in a PNG text chunk named "parameters"."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64), "white").save(path, pnginfo=info)
    return path


def _a1111_text(lora_line, hashes):
    return (f"a red circle {lora_line}\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, "
            f"CFG scale: 5, Seed: 7, Size: 64x64, Model hash: 0123456789, Model: demo, Lora hashes: \"{hashes}\", "
            "Version: v1.9.4")


def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("file_name, short_hash", [
    ("alpha", lambda p: _sha(p)[:10]),               # found by name (the hash as AutoV2)
    ("renamed", lambda p: _sha(p)[:10]),             # found only by the file's AutoV2
    ("renamed", lambda p: lora_hash(p)),             # found only by A1111's 12-digit tensor-data hash
])
def test_cli_mix_from_png_re_renders_an_a1111_picture(tmp_path, base_loader, capsys, file_name, short_hash):
    lora = write_kohya_lora(tmp_path / "loras" / f"{file_name}.safetensors", demo_or_random_pipeline(), seed=1)
    src = _a1111_png(tmp_path / "a1111.png", _a1111_text("<lora:alpha:0.8>", f"alpha: {short_hash(lora)}"))
    out = tmp_path / "out"
    assert main(["mix", "--from-png", str(src), "--base", "demo", "--lora-dir", str(tmp_path / "loras"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert base_loader == ["demo"]
    assert ("found by its hash" in printed) == (file_name == "renamed")
    text = read_png_parameters(out / "00000-7.png")
    info = parse_infotext(text)
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["steps"], info["cfg"]) == (
        "a red circle", "blurry", 7, 3, 5.0)
    assert (info["sampler"], info["width"], info["height"]) == ("DPM++ 2M Karras", 64, 64)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text
    assert info["loras"] == [("alpha", 0.8, None)]


def test_cli_mix_from_png_notes_a_missing_lora_and_command_line_wins(tmp_path, base_loader, capsys):
    lora = write_kohya_lora(tmp_path / "loras" / "alpha.safetensors", demo_or_random_pipeline(), seed=1)
    src = _a1111_png(tmp_path / "a1111.png", _a1111_text("<lora:alpha:0.8> <lora:gone:0.5>",
                                                         f"alpha: {_sha(lora)[:10]}, gone: 0123456789"))
    out = tmp_path / "out"
    assert main(["mix", "--from-png", str(src), "--base", "demo", "--lora-dir", str(tmp_path / "loras"),
                 "--seed", "9", "--lora", "alpha:0.25", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: LoRA 'gone' not found" in printed
    info = parse_infotext(read_png_parameters(out / "00000-9.png"))
    assert (info["seed"], info["steps"], info["loras"]) == (9, 3, [("alpha", 0.25, None)])


def test_cli_mix_from_png_without_its_checkpoint_says_how_to_give_it(tmp_path, base_loader, capsys):
    src = _a1111_png(tmp_path / "a1111.png", "a cat\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, "
                                             "Size: 64x64, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly")
    assert main(["mix", "--from-png", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'v1-5-pruned-emaonly' was not found" in err and "--base" in err and "--model-dir" in err
    assert base_loader == []


def test_cli_mix_from_png_finds_a_renamed_checkpoint_by_its_model_hash(tmp_path, base_loader, capsys):
    from tiny_families import tiny_pipeline, write_ldm_checkpoint

    ckpt = write_ldm_checkpoint(tiny_pipeline("sd1"), tmp_path / "models" / "renamed-model.safetensors")
    src = _a1111_png(tmp_path / "a1111.png", "a cat\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, "
                                             f"Size: 64x64, Model hash: {_sha(ckpt)[:10]}, Model: original-name")
    assert main(["mix", "--from-png", str(src), "--model-dir", str(tmp_path / "models"),
                 "--out", str(tmp_path / "o")]) == 0
    assert base_loader == [str(ckpt)]
    assert "checkpoint 'original-name' found by its hash" in capsys.readouterr().out

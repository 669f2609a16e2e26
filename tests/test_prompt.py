"""prompt.py: A1111's <lora:...> syntax, table-driven, and resolving names against a LoRA folder."""

from __future__ import annotations

import pytest

from lora_studio.errors import ConfigError, InputFileError
from lora_studio.prompt import LoraRequest, parse_prompt, resolve_requests, strip_lora_tags


@pytest.mark.parametrize("text, prompt, loras", [
    ("a red circle", "a red circle", []),
    ("a red circle <lora:stripes:0.7>", "a red circle", [("stripes", 0.7, None)]),
    ("<lora:stripes> a red circle", "a red circle", [("stripes", 1.0, None)]),
    # A1111: first number = text encoder, second = UNet
    ("a <lora:s:0.7:0.3> b", "a b", [("s", 0.3, 0.7)]),
    ("x <lora:s:te=0.2:unet=0.9>", "x", [("s", 0.9, 0.2)]),
    ("x <lora:s:0.5:unet=1>", "x", [("s", 1.0, 0.5)]),
    ("x <lora:s:-0.5>", "x", [("s", -0.5, None)]),
    ("x <lyco:loha_style:0.6>", "x", [("loha_style", 0.6, None)]),
    ("x <LORA:Mixed Case:0.6>", "x", [("Mixed Case", 0.6, None)]),
    ("x <lora:sub/dir/name:1.5>", "x", [("sub/dir/name", 1.5, None)]),
    ("a, <lora:a:1>, b <lora:b:0.5>", "a, b", [("a", 1.0, None), ("b", 0.5, None)]),
    ("<lora:a:1>", "", [("a", 1.0, None)]),
    ("keep <other:tag> text", "keep <other:tag> text", []),
])
def test_parse_prompt_table(text, prompt, loras):
    parsed = parse_prompt(text)
    assert parsed.prompt == prompt
    assert [(r.name, r.strength, r.te_strength) for r in parsed.loras] == loras


@pytest.mark.parametrize("text, words", [
    ("x <lora:s:abc>", ["'abc'", "not a number"]),
    ("x <lora::0.5>", ["no LoRA name"]),
    ("x <lora:s:1:2:3>", ["3 numbers"]),
    ("x <lora:s:dyn=4>", ["'dyn'", "te, unet"]),
    ("x <lora:s:inf>", ["not finite"]),
    ("<lora:s:1> <lora:s:0.5>", ["twice"]),
])
def test_bad_tags_say_what_is_wrong(text, words):
    with pytest.raises(ConfigError) as err:
        parse_prompt(text)
    for w in words:
        assert w in str(err.value)


def test_effective_te_and_strip():
    assert LoraRequest("a", 0.3, None).effective_te == 0.3
    assert LoraRequest("a", 0.3, 0.7).effective_te == 0.7
    assert strip_lora_tags("a <lora:x:1> b") == "a b"
    assert strip_lora_tags("  untouched  ") == "  untouched  "


def test_resolve_requests_against_a_folder(tmp_path):
    (tmp_path / "styles").mkdir()
    for rel in ("stripes.safetensors", "styles/Dots.safetensors", "notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    parsed = parse_prompt("a <lora:stripes:0.5> <lora:dots:1>")
    found = resolve_requests(parsed.loras, tmp_path)
    assert [p.name for _, p in found] == ["stripes.safetensors", "Dots.safetensors"]
    with pytest.raises(InputFileError) as err:
        resolve_requests(parse_prompt("<lora:missing:1>").loras, tmp_path)
    msg = str(err.value)
    assert "'missing'" in msg and "stripes" in msg and "styles/Dots" in msg and "notes" not in msg
    with pytest.raises(ConfigError, match="no LoRA folder"):
        resolve_requests(parsed.loras, None)


def test_add_prompt_loras_reads_each_file_once(tmp_path, monkeypatch):
    from lora_factories import demo_or_random_pipeline, write_kohya_lora
    import lora_studio.mix.mixer as mix
    from lora_studio.mix import LoraMixer
    from lora_studio.prompt import add_prompt_loras

    pipe = demo_or_random_pipeline()
    write_kohya_lora(tmp_path / "stripes.safetensors", pipe, seed=1)
    reads = []
    real = mix.read_lora
    monkeypatch.setattr(mix, "read_lora", lambda p: reads.append(p) or real(p))
    mixer = LoraMixer(pipe)
    parsed = add_prompt_loras(mixer, "a red circle <lora:stripes:0.5>", tmp_path)
    assert parsed.prompt == "a red circle" and len(reads) == 1
    add_prompt_loras(mixer, "a red circle <lora:stripes:0.2:0.9>", tmp_path)   # edited tag: te 0.2, unet 0.9
    assert len(reads) == 1
    assert [(e.name, e.strength, e.effective_te_strength) for e in mixer.entries] == [("stripes", 0.9, 0.2)]

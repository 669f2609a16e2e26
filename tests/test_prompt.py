"""prompt.py: A1111's <lora:...> syntax, table-driven, and resolving names against a LoRA folder."""

from __future__ import annotations

import pytest

from lora_studio.errors import ConfigError, InputFileError
from lora_studio.prompt import LoraRequest, parse_prompt, parse_prompt_attention, resolve_requests, strip_lora_tags


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
    ("x <lora:s:bogus=4>", ["'bogus'", "te, unet"]),
    ("x <lora:s:inf>", ["not finite"]),
    ("<lora:s:1> <lora:s:0.5>", ["twice"]),
])
def test_bad_tags_say_what_is_wrong(text, words):
    with pytest.raises(ConfigError) as err:
        parse_prompt(text)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("text, loras", [
    ("x <lora:s:0.5:lbw=INALL>", [("s", 0.5, None)]),
    ("x <lora:s:0.8:dyn=4>", [("s", 0.8, None)]),
    ("x <lora:s:0.7:0.3:start=5:stop=10>", [("s", 0.3, 0.7)]),
    ("x <lora:s:unet=0.6:lbw=1,0,0,1>", [("s", 0.6, 1.0)]),
])
def test_extension_options_are_ignored_with_a_warning(text, loras, caplog):
    with caplog.at_level("WARNING", logger="lora_studio.prompt"):
        parsed = parse_prompt(text)
    assert [(r.name, r.strength, r.te_strength) for r in parsed.loras] == loras
    assert "does not apply" in caplog.text and "ignored" in caplog.text


# AUTOMATIC1111's own examples (the docstring of modules/prompt_parser.py parse_prompt_attention)
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]

# more cases, worked out by hand from A1111's rules (x1.1 per round bracket, x(1/1.1) per square bracket)
OWN_EXAMPLES = [
    ("", [["", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("BREAKING break BREAK", [["BREAKING break", 1.0], ["BREAK", -1], ["", 1.0]]),   # only the uppercase word
    ("[[x]]", [["x", (1 / 1.1) * (1 / 1.1)]]),
    ("((a)[b])", [["a", 1.1 * 1.1], ["b", (1 / 1.1) * 1.1]]),
    ("(x:0)", [["x", 0.0]]),
    ("(x:-1.5) [y", [["x", -1.5], [" ", 1.0], ["y", 1 / 1.1]]),
    ("( x : 1.25 )", [[" x ", 1.25]]),
    ("  (a)  ", [["  ", 1.0], ["a", 1.1], ["  ", 1.0]]),
    ("a) b]", [["a) b]", 1.0]]),                          # closing with nothing open: text
    ("(a:b)", [["a:b", 1.1]]),                            # not a weight: the colon is text
    ("x:1.2) y", [["x:1.2) y", 1.0]]),                    # a weight with no open bracket is text
    ("a \\\\ b \\[c\\)", [["a \\ b [c)", 1.0]]),
    ("a\\b", [["ab", 1.0]]),                            # a lone backslash is dropped
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES + OWN_EXAMPLES)
def test_parse_prompt_attention_matches_a1111(text, expected):
    assert parse_prompt_attention(text) == expected


def test_bad_explicit_weight_says_what_to_write():
    with pytest.raises(ConfigError, match=r"\(word:1\.3\)"):
        parse_prompt_attention("(word:1.2.3)")


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

"""prompt_weights.py: A1111 emphasis, 75-token chunks and BREAK as conditioning tensors, checked against the
pipeline's own ``encode_prompt`` (the demo SD1 pipeline, the tiny SD2 and SDXL ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_studio.errors import ConfigError
from lora_studio.prompt_weights import chunk_prompt, prompt_embeds
from lora_studio.render import GenParams, make_scheduler, params_from_infotext, render
from tiny_families import tiny_pipeline

LONG = "red circle " * 75            # 150 tokens: "red" and "circle" are one token each in the demo vocabulary
FIRST_75 = "red circle " * 37 + "red"
LAST_75 = "circle " + "red circle " * 37


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def pipe(request, demo_pipe):
    return demo_pipe if request.param == "sd1" else tiny_pipeline(request.param)


def is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def reference(pipe, text: str, negative: str | None = None):
    """diffusers' own conditioning for ``text``: (embeds, negative, pooled, negative pooled)."""
    out = pipe.encode_prompt(text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                             negative_prompt=negative)
    return out if is_sdxl(pipe) else (*out, None, None)


def test_unweighted_prompt_equals_encode_prompt(pipe):
    got = prompt_embeds(pipe, "a red circle", "blurry")
    embeds, negative, pooled, negative_pooled = reference(pipe, "a red circle", "blurry")
    assert torch.equal(got["prompt_embeds"], embeds)
    assert torch.equal(got["negative_prompt_embeds"], negative)
    if is_sdxl(pipe):
        assert torch.equal(got["pooled_prompt_embeds"], pooled)
        assert torch.equal(got["negative_pooled_prompt_embeds"], negative_pooled)


def test_empty_negative_prompt_as_the_pipeline_does(pipe):
    got = prompt_embeds(pipe, "a red circle", "")
    # diffusers: SDXL zeros an absent negative prompt (force_zeros_for_empty_prompt); SD1 encodes ""
    _, negative, _, negative_pooled = reference(pipe, "a red circle", None)
    assert torch.equal(got["negative_prompt_embeds"], negative)
    if is_sdxl(pipe):
        assert torch.equal(got["negative_pooled_prompt_embeds"], negative_pooled)
        assert not negative.any()


@pytest.mark.parametrize("text, weight", [
    ("a (red:1.5) circle", 1.5),
    ("a (red) circle", 1.1),
    ("a ((red)) circle", 1.1 * 1.1),
    ("a [red] circle", 1 / 1.1),
    ("a (red:0.25) circle", 0.25),
])
def test_weighted_tokens_are_scaled_then_rescaled_to_the_mean(pipe, text, weight):
    plain, _, pooled, _ = reference(pipe, "a red circle")
    # "a red circle" is 3 tokens: "red" sits at position 2 (after BOS and "a")
    assert pipe.tokenizer("a red circle", add_special_tokens=False)["input_ids"] == [320, 513, 539]
    scale = torch.ones(1, 77, 1)
    scale[0, 2, 0] = weight
    widths = [pipe.text_encoder.config.hidden_size]
    if is_sdxl(pipe):
        widths.append(pipe.text_encoder_2.config.hidden_size)
    parts = []
    for part in plain.split(widths, dim=-1):        # each encoder is weighted and rescaled on its own
        scaled = part * scale
        parts.append(scaled * (part.mean() / scaled.mean()))
    expected = torch.cat(parts, dim=-1)
    got = prompt_embeds(pipe, text)
    torch.testing.assert_close(got["prompt_embeds"], expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got["prompt_embeds"], plain)
    if is_sdxl(pipe):
        assert torch.equal(got["pooled_prompt_embeds"], pooled)   # the pooled embedding is not weighted


def test_150_tokens_make_two_chunks_each_encoded_alone(pipe):
    assert [len(c.tokens) for c in chunk_prompt(pipe.tokenizer, LONG)] == [75, 75]
    got = prompt_embeds(pipe, LONG, "blurry")
    first, _, first_pooled, _ = reference(pipe, FIRST_75)
    last, _, _, _ = reference(pipe, LAST_75)
    assert got["prompt_embeds"].shape[1] == 154
    assert torch.equal(got["prompt_embeds"][:, :77], first)
    assert torch.equal(got["prompt_embeds"][:, 77:], last)
    # the negative prompt is padded to as many chunks with the empty prompt's chunk
    blurry, _, _, _ = reference(pipe, "blurry")
    empty, _, _, _ = reference(pipe, "")
    assert torch.equal(got["negative_prompt_embeds"], torch.cat([blurry, empty], dim=1))
    if is_sdxl(pipe):
        assert torch.equal(got["pooled_prompt_embeds"], first_pooled)   # pooled: first chunk only


def test_76_tokens_spill_into_a_second_chunk(demo_pipe):
    assert [len(c.tokens) for c in chunk_prompt(demo_pipe.tokenizer, FIRST_75)] == [75]
    assert [len(c.tokens) for c in chunk_prompt(demo_pipe.tokenizer, FIRST_75 + " circle")] == [75, 1]


def test_break_starts_a_new_chunk(pipe):
    got = prompt_embeds(pipe, "red circle BREAK blue square")
    first, _, _, _ = reference(pipe, "red circle")
    second, _, _, _ = reference(pipe, "blue square")
    assert torch.equal(got["prompt_embeds"], torch.cat([first, second], dim=1))
    assert [len(c.tokens) for c in chunk_prompt(pipe.tokenizer, "a BREAK BREAK b")] == [1, 0, 1]


def test_clip_skip_2_is_the_penultimate_layer_with_the_final_norm(demo_pipe):
    te = demo_pipe.text_encoder
    ids = demo_pipe.tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])
    got = prompt_embeds(demo_pipe, "a red circle", clip_skip=2)["prompt_embeds"]
    assert torch.equal(got, expected)
    with pytest.raises(ConfigError, match="from 1 to 2"):
        prompt_embeds(demo_pipe, "a red circle", clip_skip=3)


def test_render_uses_the_weighted_chunked_prompt(demo_pipe):
    text = "a (red:1.3) circle BREAK [blue] square"
    params = GenParams(text, steps=2, seed=3)
    image = np.asarray(render(demo_pipe, params).image)

    # the same conditioning built here from diffusers' own encodings of each chunk
    def weighted(chunk_text, weight, position=2):
        plain, _, _, _ = reference(demo_pipe, chunk_text)
        scaled = plain.clone()
        scaled[:, position] *= weight
        return scaled * (plain.mean() / scaled.mean())

    embeds = torch.cat([weighted("a red circle", 1.3), weighted("blue square", 1 / 1.1, position=1)], dim=1)
    empty, _, _, _ = reference(demo_pipe, "")
    demo_pipe.scheduler = make_scheduler("DDIM", demo_pipe.scheduler.config)
    direct = demo_pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.cat([empty, empty], dim=1),
                       num_inference_steps=2, guidance_scale=params.cfg, width=64, height=64,
                       generator=torch.Generator(device="cpu").manual_seed(3)).images[0]
    assert image.shape == (64, 64, 3)
    np.testing.assert_allclose(image.astype(int), np.asarray(direct).astype(int), atol=1)


def test_render_records_clip_skip(demo_pipe):
    rendered = render(demo_pipe, GenParams("a red circle", steps=2, clip_skip=2))
    assert "Clip skip: 2" in rendered.infotext
    assert params_from_infotext(rendered.infotext)[0].clip_skip == 2
    with pytest.raises(ConfigError, match="clip skip"):
        render(demo_pipe, GenParams("a red circle", steps=2, clip_skip=0))


def test_a_longer_negative_prompt_pads_the_prompt(demo_pipe):
    got = prompt_embeds(demo_pipe, "blurry", LONG)
    blurry, _, _, _ = reference(demo_pipe, "blurry")
    empty, _, _, _ = reference(demo_pipe, "")
    assert torch.equal(got["prompt_embeds"], torch.cat([blurry, empty], dim=1))
    assert got["negative_prompt_embeds"].shape[1] == 154

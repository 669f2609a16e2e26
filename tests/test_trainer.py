"""Proof that training learns: a short CPU run on the demo *style* set (striped shapes) makes the demo model draw
stripes, while the base weights stay bit-identical, and the file behaves the same in diffusers and in our mixer.

The stripe metric is computed here: the amplitude of the period-16 px component of the picture's row-mean
brightness profile (the style's black bands are 8 px tall every 16 px). The style pictures score ~0.45,
plain shapes ~0.03.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_studio.demo import load_demo_pipeline
from lora_studio.mix import LoraMixer
from lora_studio.train.config import load_preset
from lora_studio.train.images import load_image
from lora_studio.train.trainer import train
from train_threads import one_torch_thread  # noqa: F401  (autouse: one torch thread)

PROMPTS = ("a red circle", "a blue square", "a green triangle")
SEEDS = (0, 1)


def stripe_amplitude(image: np.ndarray, period: int = 16) -> float:
    """Amplitude (0..1 brightness) of the row-mean profile's Fourier component with the given period."""
    grey = image.astype(np.float64).mean(axis=2)
    grey = grey / 255.0 if grey.max() > 1.5 else grey
    profile = grey.mean(axis=1)
    spectrum = np.fft.rfft(profile - profile.mean())
    return float(2 * abs(spectrum[len(profile) // period]) / len(profile))


def render(pipe) -> list[np.ndarray]:
    out = []
    for seed in SEEDS:
        for prompt in PROMPTS:
            gen = torch.Generator().manual_seed(seed)
            out.append(pipe(prompt, num_inference_steps=12, guidance_scale=4.0, generator=gen, height=64, width=64,
                            output_type="np").images[0])
    return out


@pytest.fixture(scope="module")
def trained(demo_model_dir, demo_dataset, tmp_path_factory):
    pipe = load_demo_pipeline()
    weights = {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "vae")
               for k, v in getattr(pipe, c).state_dict().items()}
    cfg = load_preset("demo-cpu").replace(data_dir=str(demo_dataset), output_dir=str(tmp_path_factory.mktemp("runs")),
                                          run_name="stripes")
    result = train(cfg, pipeline=pipe)
    return result, pipe, weights


def test_metric_separates_style_from_plain(demo_dataset):
    from lora_studio.demo.shapes import draw_shape, random_spec
    import random

    style = [stripe_amplitude(np.asarray(load_image(p))) for p in sorted(demo_dataset.rglob("*.png"))]
    rng = random.Random(0)
    plain = [stripe_amplitude(np.asarray(draw_shape(random_spec(rng)))) for _ in range(12)]
    assert min(style) > 0.3 and max(plain) < 0.1


def test_training_learns_the_style_and_leaves_the_base_alone(trained):
    result, pipe, weights = trained
    assert result.steps_done == len(result.losses) and not result.stopped
    after = {f"{c}.{k}": v for c in ("unet", "text_encoder", "vae") for k, v in getattr(pipe, c).state_dict().items()}
    assert after.keys() == weights.keys()
    assert all(torch.equal(weights[k], after[k]) for k in weights)               # bit-identical base

    base_scores = [stripe_amplitude(im) for im in render(pipe)]
    styled = load_demo_pipeline()
    styled.load_lora_weights(str(result.lora_path))                             # diffusers' own kohya loader
    lora_images = render(styled)
    lora_scores = [stripe_amplitude(im) for im in lora_images]
    print(f"stripe amplitude base {np.mean(base_scores):.3f} -> LoRA {np.mean(lora_scores):.3f}")
    assert np.mean(lora_scores) > np.mean(base_scores) + 0.05
    assert np.mean(lora_scores) > 2.5 * np.mean(base_scores)
    assert sum(lo > b for lo, b in zip(lora_scores, base_scores)) >= len(base_scores) - 1

    mixed = load_demo_pipeline()                                                 # our own reader and merge
    mixer = LoraMixer(mixed)
    mixer.add(result.lora_path)
    assert mixer.entries[0].unmatched == []
    mixer.apply()
    ours = render(mixed)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours, lora_images)) < 2e-3

"""Latent and text-embedding caches give exactly what encoding on the fly gives, and encode only once."""

from __future__ import annotations

import pytest
import torch

import lora_studio.train.cache as cache_mod
from lora_studio.demo import make_demo_dataset, random_demo_pipeline
from lora_studio.train.cache import LatentCache, TextCache, encode_prompts
from lora_studio.train.dataset import BucketBatches, scan_images
from train_threads import one_torch_thread  # noqa: F401  (autouse: one torch thread)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = make_demo_dataset(tmp_path_factory.mktemp("cache-data"), count=3, repeats=1)
    items = BucketBatches(scan_images(data), 2, 0, 64, min_reso=32, max_reso=128, step=8).items
    return random_demo_pipeline(), items


def test_latent_cache_modes_agree_and_disk_cache_is_reused(setup, tmp_path, monkeypatch):
    pipe, items = setup
    none = LatentCache(pipe.vae, items, "none").get([0, 1, 2])
    mem = LatentCache(pipe.vae, items, "memory").get([2, 0])
    assert none.shape == (3, 4, 16, 16)
    torch.testing.assert_close(mem, none[[2, 0]], rtol=1e-5, atol=1e-6)
    disk = LatentCache(pipe.vae, items, "disk", tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    torch.testing.assert_close(disk.get([1]), none[[1]], rtol=1e-5, atol=1e-6)
    calls = []
    real = cache_mod.encode_pixels
    monkeypatch.setattr(cache_mod, "encode_pixels", lambda *a: calls.append(1) or real(*a))
    LatentCache(pipe.vae, items, "disk", tmp_path)                      # same images, same VAE: nothing to encode
    assert calls == []
    with torch.no_grad():
        pipe.vae.encoder.conv_in.weight.mul_(1.5)                        # a different VAE must not reuse them
    LatentCache(pipe.vae, items, "disk", tmp_path)
    assert calls


def test_text_cache_encodes_each_caption_once(setup):
    pipe, _ = setup
    calls = []

    def encode(captions):
        calls.append(len(captions))
        return (encode_prompts(pipe.tokenizer, pipe.text_encoder, captions, "cpu"),)

    cache = TextCache(encode)
    (a,) = cache.get(["a red circle", "a blue square", "a red circle"])
    (b,) = cache.get(["a blue square"])
    assert calls == [2] and len(cache) == 2
    ref = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle", "a blue square"], "cpu").detach()
    torch.testing.assert_close(a, ref[[0, 1, 0]])
    torch.testing.assert_close(b, ref[[1]])
    off = TextCache(encode, enabled=False)
    off.get(["a red circle"])
    off.get(["a red circle"])
    assert calls == [2, 1, 1] and len(off) == 0

"""The loss: epsilon / v targets and min-SNR-gamma weights against the formulas written out by hand."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lora_studio.train.objective import diffusion_loss, sample_noise


@pytest.fixture()
def sched():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_noise_is_seeded_and_offset_is_per_channel():
    x = torch.zeros(3, 4, 8, 8)
    n1, t1 = sample_noise(x, torch.Generator().manual_seed(5), 1000)
    n2, t2 = sample_noise(x, torch.Generator().manual_seed(5), 1000)
    assert torch.equal(n1, n2) and torch.equal(t1, t2) and t1.dtype == torch.int64 and (t1 < 1000).all()
    n3, _ = sample_noise(x, torch.Generator().manual_seed(5), 1000, noise_offset=0.5)
    offset = n3[:, :, :, :] - torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset))   # constant over each channel
    assert offset.abs().max() > 0.01


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_loss_matches_hand_formula(sched, prediction, gamma):
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([1, 100, 500, 999])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = noise if prediction == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if gamma:
        snr = (abar / (1 - abar)).flatten()
        w = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1 if prediction == "v_prediction" else snr)
        per = per * w
        assert w[0] < 1 or prediction == "v_prediction"                     # easy (low-noise) steps weigh less
    got = diffusion_loss(pred, x0, noise, t, sched, prediction, gamma)
    torch.testing.assert_close(got, per.mean(), rtol=1e-5, atol=1e-7)

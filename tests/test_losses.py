"""The hybrid loss: ε-MSE plus the learned variance's variational bound (Improved DDPM / IF)."""

import pytest
import torch
from diffusers import DDPMScheduler

from show1.training.losses import diffusion_loss, variational_bound

SCHEDULE = DDPMScheduler(beta_schedule="squaredcos_cap_v2")


def problem(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 4, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    steps = torch.full((2,), t)
    return x0, noise, SCHEDULE.add_noise(x0, noise, steps), steps


def test_bound_vanishes_for_the_true_noise_and_the_posterior_variance():
    x0, noise, x_t, t = problem(500)
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # v = -1: the posterior variance
    assert variational_bound(exact, x0, x_t, t, SCHEDULE.alphas_cumprod).abs().max() < 1e-4
    # v = +1 (beta_t instead of the posterior variance) costs bits where the two differ: small t.
    x0, noise, x_t, t = problem(5)
    wrong = torch.cat([noise, torch.ones_like(noise)], dim=1)
    assert variational_bound(wrong, x0, x_t, t, SCHEDULE.alphas_cumprod).min() > 1e-2


def test_bound_at_t0_is_the_decoder_likelihood_and_finite():
    x0, noise, x_t, t = problem(0)
    bound = variational_bound(torch.cat([noise, torch.zeros_like(noise)], dim=1), x0, x_t, t,
                              SCHEDULE.alphas_cumprod)
    assert torch.isfinite(bound).all() and (bound > 0).all()


def test_only_the_variance_channels_learn_from_the_bound():
    x0, noise, x_t, t = problem(300)
    prediction = torch.cat([noise + 0.1, torch.zeros_like(noise)], dim=1).requires_grad_(True)
    variational_bound(prediction, x0, x_t, t, SCHEDULE.alphas_cumprod).sum().backward()
    assert prediction.grad[:, :3].abs().max() == 0 and prediction.grad[:, 3:].abs().max() > 0


def test_hybrid_adds_the_weighted_bound_to_the_mse():
    x0, noise, x_t, t = problem(700)
    prediction = torch.cat([noise * 0.9, torch.full_like(noise, 0.5)], dim=1)
    mse = diffusion_loss(prediction, noise, "epsilon")
    hybrid = diffusion_loss(prediction, noise, "hybrid", x0, x_t, t, SCHEDULE.alphas_cumprod, vlb_weight=1.0)
    bound = variational_bound(prediction, x0, x_t, t, SCHEDULE.alphas_cumprod).mean()
    torch.testing.assert_close(hybrid, mse + bound)
    with pytest.raises(ValueError, match="predicts its variance"):
        diffusion_loss(noise, noise, "hybrid", x0, x_t, t, SCHEDULE.alphas_cumprod)

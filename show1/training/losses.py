"""Diffusion training losses: ε-MSE, and IF's hybrid loss for UNets that also predict their variance.

The hybrid loss (Nichol & Dhariwal, "Improved DDPM") adds to the ε-MSE the variational bound term of the
learned variance ("learned_range": an interpolation, per pixel, between log β_t and the clipped log of the
posterior variance β̃_t), with a stop-gradient on the mean so only the variance channels learn from it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _at(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))


def _normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """−log p(x) of 8-bit data in [−1, 1] under a Gaussian, per element (nats)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -log_probs


def variational_bound(prediction: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The learned variance's VLB term in bits per dimension, per batch element. `prediction` holds ε (first
    half of the channels, treated as constant) and the variance interpolation v ∈ [−1, 1] (second half)."""
    channels = x0.shape[1]
    eps, v = prediction[:, :channels].detach(), prediction[:, channels:]
    ndim = x0.dim()
    alphas_cumprod = alphas_cumprod.float()
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    betas = 1 - alphas_cumprod / prev
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
    coef_x0 = betas * prev.sqrt() / (1 - alphas_cumprod)
    coef_xt = (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)

    a, b = _at(coef_x0, t, ndim), _at(coef_xt, t, ndim)
    true_mean, true_log_var = a * x0 + b * x_t, _at(posterior_log_variance, t, ndim)
    frac = (v.float() + 1) / 2
    model_log_var = frac * _at(torch.log(betas), t, ndim) + (1 - frac) * true_log_var
    ac = _at(alphas_cumprod, t, ndim)
    x0_pred = (x_t - (1 - ac).sqrt() * eps.float()) / ac.sqrt()
    model_mean = a * x0_pred + b * x_t

    dims = tuple(range(1, ndim))
    kl = _normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=dims) / math.log(2.0)
    nll = _discretized_gaussian_nll(x0, model_mean, 0.5 * model_log_var).mean(dim=dims) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def diffusion_loss(prediction: torch.Tensor, noise: torch.Tensor, kind: str = "epsilon",
                   x0: torch.Tensor | None = None, x_t: torch.Tensor | None = None, t: torch.Tensor | None = None,
                   alphas_cumprod: torch.Tensor | None = None, vlb_weight: float = 0.001) -> torch.Tensor:
    """ε-MSE on the first `noise.shape[1]` channels; `hybrid` adds `vlb_weight` × the variance's VLB term."""
    channels = noise.shape[1]
    mse = F.mse_loss(prediction[:, :channels].float(), noise.float())
    if kind == "epsilon":
        return mse
    if kind != "hybrid":
        raise ValueError(f"unknown loss '{kind}' (epsilon | hybrid)")
    if prediction.shape[1] != 2 * channels:
        raise ValueError(f"the hybrid loss needs a UNet that predicts its variance ({2 * channels} output "
                         f"channels), this one has {prediction.shape[1]}")
    assert x0 is not None and x_t is not None and t is not None and alphas_cumprod is not None
    return mse + vlb_weight * variational_bound(prediction, x0, x_t, t, alphas_cumprod).mean()

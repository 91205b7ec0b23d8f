"""Sigmas, EDM preconditioning, guidance and samplers: plain functions over a denoiser callable.

A denoiser is `D(x, sigma) -> denoised`, x in the variance-exploding form x = x0 + sigma * n (Karras et al.
2022, "Elucidating the Design Space of Diffusion-Based Generative Models", EDM). The samplers follow
k-diffusion's formulations; `euler` with no churn is exactly the reference's EulerEDMSampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step, total, x, denoised): x after the step, denoised the estimate of the clean latents it used
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def edm_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0
) -> torch.Tensor:
    """Karras/EDM discretisation (EDM eq. 5), descending, with a final 0: (num_steps + 1,) float32."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def v_edm_scalings(sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Preconditioning of SVD's v-prediction network (sigma_data = 1): c_skip, c_out, c_in, c_noise."""
    s2 = sigma**2 + 1
    return 1 / s2, -sigma / s2.sqrt(), 1 / s2.sqrt(), 0.25 * sigma.log()


def guidance_scales(kind: str, min_scale: float, max_scale: float, num_frames: int) -> torch.Tensor:
    """Per-frame classifier-free guidance scale, (num_frames,) float32.

    linear   -- min on the first frame to max on the last (the reference's LinearPredictionGuider)
    triangle -- min at both ends, max in the middle (the reference's TrianglePredictionGuider, period 1)
    constant -- max on every frame
    """
    if kind == "linear":
        return torch.linspace(min_scale, max_scale, num_frames)
    if kind == "triangle":
        v = torch.linspace(0, 1, num_frames)
        tri = 2 * (v - torch.floor(v + 0.5)).abs()
        return tri * (max_scale - min_scale) + min_scale
    if kind == "constant":
        return torch.full((num_frames,), float(max_scale))
    raise ValueError(f"unknown guidance {kind!r}")


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uncond + scale * (cond - uncond), scale broadcast over frames (the batch dimension)."""
    return uncond + scale.view(-1, *([1] * (cond.ndim - 1))).to(cond) * (cond - uncond)


def _report(
    callback: StepCallback | None, i: int, total: int, x: torch.Tensor, denoised: torch.Tensor
) -> None:
    if callback is not None:
        callback(i + 1, total, x, denoised)


@torch.no_grad()
def sample_euler(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None
):
    """Euler's method on the probability-flow ODE (EDM Alg. 1 without the Heun correction)."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        _report(callback, i, n, x, denoised)
    return x


@torch.no_grad()
def sample_heun(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None
):
    """Heun's 2nd-order method (EDM Alg. 1, no churn): two network calls per step but the last."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - denoise(x2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d2) / 2 * dt
        _report(callback, i, n, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None
):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), multistep, one network call per step."""
    n = len(sigmas) - 1
    old = None
    for i in range(n):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = t_next - t
            estimate = denoised
            if old is not None:  # the multistep correction extrapolates from the previous raw estimate
                r = (t + sigmas[i - 1].log()) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * estimate
        old = denoised
        _report(callback, i, n, x, denoised)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}


def initial_latents(noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The reference scales unit noise by sqrt(1 + sigma_max^2) (its x lives at variance 1 + sigma^2)."""
    return noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)

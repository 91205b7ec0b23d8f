"""The three networks of SVD. `build` makes them on any device (use "meta" before loading weights)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .clip import ImageEncoder
from .unet import UNet
from .vae import VAE

__all__ = ["UNet", "VAE", "ImageEncoder", "build", "init_random"]


def build(cfg: ModelConfig, device: str | torch.device = "meta") -> dict[str, nn.Module]:
    with torch.device(device):
        return {"unet": UNet(cfg.unet), "vae": VAE(cfg.vae), "image_encoder": ImageEncoder(cfg.clip)}


@torch.no_grad()
def init_random(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Deterministic random weights for every parameter, drawn where the parameter lives (on a GPU this takes
    seconds even at full size): the `tiny` preset's weights, and the benchmarks'.

    Matrices get N(0, 1/fan_in) (capped at std) so activations keep their scale, norm scales 1 + noise, other
    vectors N(0, std): nothing is left at zero, so no layer is silently skipped.
    """
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in module.named_parameters():
        g = gens.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
        is_norm_scale = name.endswith("weight") and p.ndim == 1
        fan_in = p[0].numel() if p.ndim > 1 else 1
        scale = std if p.ndim <= 1 else min(std, fan_in**-0.5)
        values = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * scale
        p.copy_(values + 1.0 if is_norm_scale else values)
    return module

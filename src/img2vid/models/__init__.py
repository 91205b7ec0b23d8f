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
    """Deterministic random weights for every parameter (norm scales around 1): the `tiny` preset's weights.

    Nothing is left at zero, so no layer is silently skipped. Runs on CPU so the values are the same on
    every machine.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_norm_scale = leaf == "weight" and p.ndim == 1
        fan_in = p[0].numel() if p.ndim > 1 else 1
        scale = std if p.ndim <= 1 else min(std, fan_in**-0.5)
        values = torch.randn(p.shape, generator=g) * scale + (1.0 if is_norm_scale else 0.0)
        p.copy_(values.to(p.dtype))
    return module

"""`load()` and the Pipeline: the one generate path behind the Python API, the CLI and the server."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from . import checkpoint
from .config import ModelConfig
from .models import build, init_random

log = logging.getLogger("img2vid")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # CPUs are slow in half precision; on CUDA fp16 matches the reference's fp16 autocast.
    return torch.float16 if device.type == "cuda" else torch.float32


class Pipeline:
    def __init__(
        self,
        config: ModelConfig,
        nets: dict[str, nn.Module],
        device: torch.device,
        dtype: torch.dtype,
        source: str = "",
    ):
        self.config = config
        self.unet, self.vae, self.image_encoder = nets["unet"], nets["vae"], nets["image_encoder"]
        for net in nets.values():
            net.eval().requires_grad_(False)
        self.device, self.dtype, self.source = device, dtype, source

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def defaults(self) -> dict:
        from dataclasses import asdict

        return asdict(self.config.defaults)

    def __repr__(self) -> str:
        return f"Pipeline({self.name}, device={self.device}, dtype={self.dtype}, source={self.source!r})"


def load(
    source: str | os.PathLike = "svd-xt",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    variant: str | None = None,
) -> Pipeline:
    """Load SVD from a preset name, a hub id, a single .safetensors file or a diffusers folder.

    Networks are built on the meta device, every key is checked, and tensors are read straight to `device`
    and cast there. `variant` forces the preset used for defaults and decoder (e.g. "svd-xt-1-1").
    """
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = {
            "fp16": torch.float16,
            "float16": torch.float16,
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
            "fp32": torch.float32,
            "float32": torch.float32,
        }[dtype]
    dtype = dtype or default_dtype(device)
    resolved = checkpoint.resolve(source, variant)
    if isinstance(resolved, ModelConfig):  # random weights (the tiny preset)
        nets = build(resolved, "cpu")
        for i, net in enumerate(nets.values()):
            init_random(net, seed=i)
            net.to(device, dtype)
        return Pipeline(resolved, nets, device, dtype, source=f"{resolved.name} (random weights)")
    nets = build(resolved.config, "meta")
    checkpoint.load_into(nets, resolved, device, dtype)
    return Pipeline(resolved.config, nets, device, dtype, source=resolved.description)

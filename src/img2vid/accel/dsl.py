"""What the CUTLASS-DSL kernel packages (FlashAttention-4, quack) need, checked without importing them."""

from __future__ import annotations

import torch


def unavailable(package: str, module: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a package of CUTLASS-DSL kernels (FlashAttention-4, quack) cannot run on this device and dtype; None
    if it can, as far as can be told without importing it (which takes seconds)."""
    import importlib.util

    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip is not None:
        return "needs a CUDA device"
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return "needs compute capability 9.x or 10.x (Hopper, datacenter Blackwell)"
    if dtype != torch.float16:
        return "needs float16"
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception:  # a parent package that fails to import
        found = False
    return None if found else f"not installed (pip install {package}, or the fa4 extra)"

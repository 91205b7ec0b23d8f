"""channels_last: NHWC weights and inputs (NDHWC for the temporal 3-D convolutions), and a group norm written
for channels-last tensors.

cuDNN's tensor-core convolutions want NHWC, and the (B*T, C, H, W) <-> (B, C, T, H, W) views of the temporal
layers then need no transposes. PyTorch's group norm reduces each (sample, group) over channels that are strided
in channels-last memory; `ChannelsLastGroupNorm` reduces per channel (contiguous loads) and combines per group.
Compiled only: it is written for Inductor, and in eager mode PyTorch's kernel is the faster one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import channels_last

NAME = "channels_last"


def unavailable(device: torch.device, dtype: torch.dtype, memory: str) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return "needs float16 or bfloat16"  # fp32 3-D convolutions were slow in NDHWC
    return None


def apply(pipe, report) -> None:
    for net in (pipe.unet, pipe.vae):
        to_channels_last(net)
        swap_group_norms(net)
    pipe.memory_format = torch.channels_last


def to_channels_last(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
            elif p.ndim == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)


def swap_group_norms(net: nn.Module) -> int:
    """Make every nn.GroupNorm of `net` a ChannelsLastGroupNorm (same parameters); returns how many."""
    norms = [m for m in net.modules() if type(m) is nn.GroupNorm]
    for m in norms:
        m.__class__ = ChannelsLastGroupNorm  # a subclass with no state of its own
    return len(norms)


class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and names) that, when compiled, normalises channels-last inputs of fewer than
    FEW_ROWS (sample, group) rows with `group_norm_channels_last`: the UNet's temporal norms (one row per group of
    each video) and the VAE decoder's. With more rows PyTorch's lowering is as fast and leaves Inductor's plan for
    the transformers as it was (the other form there kept more buffers alive)."""

    FEW_ROWS = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.compiler.is_compiling() also holds while torch.export traces (the compiled path)
        if (
            torch.compiler.is_compiling()
            and channels_last(x)
            and x.shape[0] * self.num_groups < self.FEW_ROWS
        ):
            return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm_channels_last(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """F.group_norm of an (N, C, *spatial) tensor stored channels-last, in fp32: mean and variance per channel
    over the pixels (contiguous loads, N*C rows), combined per group by the law of total variance (exact for
    groups of equally many elements), then one multiply-add per element. Same result up to float rounding."""
    N, C = x.shape[:2]
    flat = x.movedim(1, -1).reshape(N, -1, C).float()  # (N, pixels, C): a view of channels-last memory
    var_c, mean_c = torch.var_mean(flat, dim=1, correction=0)  # (N, C)
    mean_c, var_c = mean_c.view(N, groups, -1), var_c.view(N, groups, -1)
    mean = mean_c.mean(-1, keepdim=True)  # (N, G, 1)
    var = var_c.mean(-1, keepdim=True) + (mean_c - mean).square().mean(-1, keepdim=True)
    scale = torch.rsqrt(var + eps).expand(N, groups, C // groups)
    if weight is not None:
        scale = scale * weight.float().view(groups, -1)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float().view(groups, -1)
    shape = (N, C) + (1,) * (x.dim() - 2)
    return (x.float() * scale.reshape(shape) + shift.reshape(shape)).to(x.dtype)

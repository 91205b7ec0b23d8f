"""RIFE's IFNet, the flow network of Practical-RIFE v4.13 (Huang et al., "Real-Time Intermediate Flow Estimation
for Video Frame Interpolation", ECCV 2022; github.com/hzwer/Practical-RIFE, MIT), in plain PyTorch.

Module names follow the published flownet state dict (`encode.cnn0`, `block0.conv0.0.0`, `block0.convblock.0.beta`,
`block0.lastconv.0`), so it loads strictly as it is. Four blocks refine a bidirectional flow coarse to fine (the
image at 1/8, 1/4, 1/2, 1); the frame at time t blends both inputs warped by it through a learned mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_WIDTHS = (192, 128, 96, 64)
SCALES = (8, 4, 2, 1)
FEATURES = 8  # channels of the per-image features of `Head`
MULTIPLE = 32  # the coarsest block works at 1/8 of the image, then halves it twice


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2, True))


class Head(nn.Module):
    """Per-image features at full resolution, warped along with the images."""

    def __init__(self):
        super().__init__()
        self.cnn0 = nn.Conv2d(3, 32, 3, 2, 1)
        self.cnn1 = nn.Conv2d(32, 32, 3, 1, 1)
        self.cnn2 = nn.Conv2d(32, 32, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(32, FEATURES, 4, 2, 1)
        self.relu = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.cnn0(x))
        x = self.relu(self.cnn1(x))
        return self.cnn3(self.relu(self.cnn2(x)))


class ResConv(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))
        self.relu = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) * self.beta + x)


class IFBlock(nn.Module):
    """One refinement level: inputs at 1/scale -> (flow (N, 4), mask logit (N, 1)) at full resolution."""

    def __init__(self, in_planes: int, c: int):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(in_planes, c // 2, 2), _conv(c // 2, c, 2))
        self.convblock = nn.Sequential(*(ResConv(c) for _ in range(8)))
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, 4 * 6, 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor, flow: torch.Tensor | None, scale: int):
        if scale != 1:
            x = F.interpolate(x, scale_factor=1 / scale, mode="bilinear", align_corners=False)
        if flow is not None:  # flows are in pixels: they shrink with the image
            small = flow
            if scale != 1:
                small = F.interpolate(flow, scale_factor=1 / scale, mode="bilinear", align_corners=False)
            x = torch.cat((x, small / scale), 1)
        out = self.lastconv(self.convblock(self.conv0(x)))
        if scale != 1:
            out = F.interpolate(out, scale_factor=scale, mode="bilinear", align_corners=False)
        return out[:, :4] * scale, out[:, 4:5]


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: each output pixel reads x at its position plus flow (N, 2, H, W) pixels; edges repeat."""
    n, _, h, w = x.shape
    gy, gx = torch.meshgrid(
        torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype),
        torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype),
        indexing="ij",
    )
    base = torch.stack((gx, gy))[None]  # (1, 2, H, W), x first as grid_sample wants
    norm = torch.cat((flow[:, :1] / ((w - 1) / 2), flow[:, 1:2] / ((h - 1) / 2)), 1)
    grid = (base + norm).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


class IFNet(nn.Module):
    def __init__(self):
        super().__init__()
        first = 3 + 3 + 2 * FEATURES + 1  # both images, their features, t
        later = first + 1 + 4  # ... warped, and the mask; the flow joins inside the block
        self.block0 = IFBlock(first, BLOCK_WIDTHS[0])
        self.block1 = IFBlock(later, BLOCK_WIDTHS[1])
        self.block2 = IFBlock(later, BLOCK_WIDTHS[2])
        self.block3 = IFBlock(later, BLOCK_WIDTHS[3])
        self.encode = Head()

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, t: float) -> torch.Tensor:
        """img0, img1 (N, 3, H, W) in [0, 1], H and W multiples of MULTIPLE -> the frame at time t in (0, 1)."""
        ts = torch.full_like(img0[:, :1], t)
        f0, f1 = self.encode(img0), self.encode(img1)
        flow = mask = None
        warped0, warped1 = img0, img1
        for block, scale in zip((self.block0, self.block1, self.block2, self.block3), SCALES, strict=True):
            if flow is None:
                flow, mask = block(torch.cat((img0, img1, f0, f1, ts), 1), None, scale)
            else:
                wf0, wf1 = warp(f0, flow[:, :2]), warp(f1, flow[:, 2:4])
                delta, mask = block(torch.cat((warped0, warped1, wf0, wf1, ts, mask), 1), flow, scale)
                flow = flow + delta
            warped0, warped1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:4])
        m = torch.sigmoid(mask)
        return warped0 * m + warped1 * (1 - m)

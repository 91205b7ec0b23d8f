"""The SVD autoencoder: the encoder of the conditioning frame, and the temporal decoder (or the per-frame one of
the image-decoder variants) that makes the video.

The reference encodes the conditioning frame with `conditioner.embedders.3.encoder` (a whole SD VAE: encoder, then
`quant_conv`) and decodes with `first_stage_model.decoder`; `first_stage_model.encoder` never makes a video. Module
names follow those keys (see checkpoint.SINGLE_FILE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .layers import group_norm


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(c_in, eps=1e-6, groups=groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out, eps=1e-6, groups=groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class TemporalResBlock(nn.Module):
    """Conv3d (k,1,1) resblock across frames, no time embedding (`time_stack` in the checkpoint)."""

    def __init__(self, c: int, kernel: int, groups: int = 32):
        super().__init__()
        ks, pad = (kernel, 1, 1), (kernel // 2, 0, 0)
        self.in_layers = nn.Sequential(
            group_norm(c, groups=groups), nn.SiLU(), nn.Conv3d(c, c, ks, padding=pad)
        )
        self.out_layers = nn.Sequential(
            group_norm(c, groups=groups), nn.SiLU(), nn.Identity(), nn.Conv3d(c, c, ks, padding=pad)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out_layers(self.in_layers(x))


class VideoResnetBlock(ResnetBlock):
    """A per-frame resnet block then a temporal one; alpha weighs the TEMPORAL branch here (unlike the UNet)."""

    def __init__(self, c_in: int, c_out: int, groups: int = 32, kernel: int = 3):
        super().__init__(c_in, c_out, groups)
        self.time_stack = TemporalResBlock(c_out, kernel, groups)
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        x = super().forward(x)
        BT, C, H, W = x.shape
        x = x.unflatten(0, (-1, num_frames)).transpose(1, 2)  # (B, C, T, H, W)
        alpha = torch.sigmoid(self.mix_factor).to(x.dtype)
        x = alpha * self.time_stack(x) + (1 - alpha) * x
        return x.transpose(1, 2).reshape(BT, C, H, W)


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, 1x1-conv projections."""

    def __init__(self, c: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(c, eps=1e-6, groups=groups)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (
            m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v)
        )  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # the reference pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, name, resample)


class Mid(nn.Module):
    def __init__(self, c: int, block: type[ResnetBlock], groups: int = 32, **kw):
        super().__init__()
        self.block_1 = block(c, c, groups, **kw)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = block(c, c, groups, **kw)

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x, num_frames)), num_frames)


class Encoder(nn.Module):
    """Image (N, 3, H, W) in [-1, 1] -> posterior moments (N, 2*latent, H/8, W/8)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(3, cfg.channels, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.channels
        for i, c_out in enumerate(chs):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, c_out, cfg.norm_groups))
                c = c_out
            last = i == len(chs) - 1
            self.down.append(Level(blocks, None if last else Downsample(c), "downsample"))
        self.mid = Mid(c, ResnetBlock, cfg.norm_groups)
        self.norm_out = group_norm(c, eps=1e-6, groups=cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class OutConv(nn.Conv2d):
    """Final conv; in the temporal decoder followed by a (k,1,1) conv across frames (`time_mix_conv`)."""

    def __init__(self, c_in: int, c_out: int, temporal: bool, kernel: int = 3):
        super().__init__(c_in, c_out, 3, padding=1)
        if temporal:
            self.time_mix_conv = nn.Conv3d(c_out, c_out, (kernel, 1, 1), padding=(kernel // 2, 0, 0))

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        x = super().forward(x)
        if not hasattr(self, "time_mix_conv"):
            return x
        BT, C, H, W = x.shape
        x = self.time_mix_conv(x.unflatten(0, (-1, num_frames)).transpose(1, 2))  # (B, C, T, H, W)
        return x.transpose(1, 2).reshape(BT, C, H, W)


class Decoder(nn.Module):
    """Latents (B*T, 4, h, w) -> frames (B*T, 3, 8h, 8w) in about [-1, 1]; temporal layers mix the T frames."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.channels * m for m in cfg.channel_mult]
        temporal = cfg.temporal_decoder
        block, kw = (VideoResnetBlock, {"kernel": cfg.video_kernel_size}) if temporal else (ResnetBlock, {})
        c = chs[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        self.mid = Mid(c, block, cfg.norm_groups, **kw)
        up = []
        for i in reversed(range(len(chs))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(block(c, chs[i], cfg.norm_groups, **kw))
                c = chs[i]
            up.insert(0, Level(blocks, Upsample(c) if i else None, "upsample"))
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(c, eps=1e-6, groups=cfg.norm_groups)
        self.conv_out = OutConv(c, 3, temporal, cfg.video_kernel_size)

    def forward(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.mid(self.conv_in(z), num_frames)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h, num_frames)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)), num_frames)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (N, 3, H, W) in [-1, 1] -> mode (mean) of the posterior, unscaled, (N, 4, H/8, W/8): what SVD
        concatenates to the UNet input."""
        return self.quant_conv(self.encoder(x))[:, : self.cfg.latent_channels]

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Scaled latents (T, 4, h, w) -> frames (T, 3, H, W); num_frames = T of this chunk."""
        return self.decoder(z / self.cfg.scale_factor, num_frames)

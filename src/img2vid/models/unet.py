"""The spatio-temporal UNet of SVD (the reference's VideoUNet), module names as in its checkpoint.

Frames of all videos in a batch are flattened into the batch dimension: x is (B*T, C, H, W) and every
temporal layer unflattens T. `num_frames` is passed down explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from .layers import (
    Attention,
    FeedForward,
    MixFactor,
    cat_channels,
    cross_attend,
    group_norm,
    timestep_embedding,
)


class ResBlock(nn.Module):
    """Conv resblock with a time-embedding shift. dims=2: per frame (3x3); dims=3: temporal (3x1x1)."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, dims: int = 2, kernel: int = 3):
        super().__init__()
        Conv = nn.Conv2d if dims == 2 else nn.Conv3d
        ks, pad = (kernel, (kernel // 2)) if dims == 2 else ((kernel, 1, 1), (kernel // 2, 0, 0))
        self.dims = dims
        self.in_layers = nn.Sequential(
            group_norm(channels), nn.SiLU(), Conv(channels, out_channels, ks, padding=pad)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels),
            nn.SiLU(),
            nn.Identity(),
            Conv(out_channels, out_channels, ks, padding=pad),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)
        if self.dims == 2:
            h = h + e[:, :, None, None]  # emb: (B*T, C_emb)
        else:
            h = h + e.transpose(1, 2)[..., None, None]  # emb: (B, T, C_emb) -> (B, C, T, 1, 1)
        return self.skip_connection(x) + self.out_layers(h)


class VideoResBlock(ResBlock):
    """A per-frame resblock followed by a temporal one, blended by a learned factor."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, kernel: int = 3):
        super().__init__(channels, emb_dim, out_channels)
        self.time_stack = ResBlock(out_channels, emb_dim, out_channels, dims=3, kernel=kernel)
        self.time_mixer = MixFactor()

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, num_frames: int, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`skip`: the decoder side's skip connection, concatenated to x here (inside the compiled block)."""
        if skip is not None:
            x = cat_channels([x, skip])
        x = super().forward(x, emb)
        BT, C, H, W = x.shape
        x = x.unflatten(0, (-1, num_frames)).transpose(1, 2)  # (B, C, T, H, W)
        x_t = self.time_stack(x, emb.unflatten(0, (-1, num_frames)))
        x = self.time_mixer(x, x_t)
        return x.transpose(1, 2).reshape(BT, C, H, W)


class TransformerBlock(nn.Module):
    """Spatial block: self-attention over pixels, cross-attention to the image embedding, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = cross_attend(self.attn2, self.norm2, x, context) + x
        return self.ff(self.norm3(x)) + x


class TemporalTransformerBlock(nn.Module):
    """Temporal block (the reference's VideoTransformerBlock): attention across the frames of each pixel."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.attn1 = Attention(dim, heads)
        self.ff = FeedForward(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm1, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: (B*T, S, C) tokens of each frame; context: (B, M, D), one per video. As the reference, attends
        across the frames of each pixel: x is transposed to (B*S, T, C) sequences and back."""
        BT, S, C = x.shape
        x = x.unflatten(0, (-1, num_frames)).transpose(1, 2).reshape(-1, num_frames, C)  # (B*S, T, C)
        x = self.ff_in(self.norm_in(x)) + x
        x = self.attn1(self.norm1(x)) + x
        v = x.reshape(context.shape[0], -1, C)  # (B, S*T, C): the tokens of each video
        x = (cross_attend(self.attn2, self.norm2, v, context) + v).view(x.shape)
        x = self.ff(self.norm3(x)) + x
        return x.unflatten(0, (-1, S)).transpose(1, 2).reshape(BT, S, C)


class SpatialVideoTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)
        self.time_stack = nn.ModuleList(
            TemporalTransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )
        self.time_pos_embed = nn.Sequential(
            nn.Linear(channels, channels * 4), nn.SiLU(), nn.Linear(channels * 4, channels)
        )
        self.time_mixer = MixFactor()

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        BT, C, H, W = x.shape
        x_in = x
        # The temporal layers attend to the first frame's context ("use_spatial_context").
        t_context = context[::num_frames]  # (B, M, D)
        x = self.norm(x).flatten(2).transpose(1, 2)  # (B*T, H*W, C)
        x = self.proj_in(x)
        frame_ids = torch.arange(num_frames, device=x.device).repeat(BT // num_frames)
        pos = self.time_pos_embed(timestep_embedding(frame_ids, C).to(x.dtype))[:, None]  # (B*T, 1, C)
        for block, t_block in zip(self.transformer_blocks, self.time_stack, strict=True):
            x = block(x, context)
            x_t = t_block(x + pos, t_context, num_frames)
            x = self.time_mixer(x, x_t)
        x = self.proj_out(x)
        return x.transpose(1, 2).reshape(BT, C, H, W) + x_in


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepBlock(nn.ModuleList):
    """One entry of input_blocks/output_blocks: a sequence of layers that each take what they need."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        num_frames: int,
        skip: torch.Tensor | None = None,
    ):
        """`skip` (output blocks): the skip connection, concatenated to x by the first layer, a VideoResBlock."""
        for layer in self:
            if isinstance(layer, VideoResBlock):
                x, skip = layer(x, emb, num_frames, skip), None
            elif isinstance(layer, SpatialVideoTransformer):
                x = layer(x, context, num_frames)
            else:
                x = layer(x)
        if skip is not None:
            raise ValueError("a skip connection needs a VideoResBlock to take it")
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, emb_dim = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(
            nn.Sequential(
                nn.Linear(cfg.vector_embed_dim * cfg.num_vector_values, emb_dim),
                nn.SiLU(),
                nn.Linear(emb_dim, emb_dim),
            )
        )

        def res(c_in: int, c_out: int) -> VideoResBlock:
            return VideoResBlock(c_in, emb_dim, c_out, kernel=cfg.video_kernel_size)

        def attn(c: int, level: int) -> SpatialVideoTransformer:
            return SpatialVideoTransformer(c, cfg.num_heads[level], cfg.context_dim, cfg.transformer_depth)

        self.input_blocks = nn.ModuleList([TimestepBlock([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        skip_channels = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if cfg.attention_levels[level]:
                    layers.append(attn(ch, level))
                self.input_blocks.append(TimestepBlock(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepBlock([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = TimestepBlock([res(ch, ch), attn(ch, len(cfg.channel_mult) - 1), res(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if cfg.attention_levels[level]:
                    layers.append(attn(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def embed_vector(self, values: torch.Tensor) -> torch.Tensor:
        """(N, 3) fps_id, motion_bucket_id, cond_aug -> (N, 768): a sinusoid of each, concatenated."""
        N, K = values.shape
        return timestep_embedding(values.flatten(), self.cfg.vector_embed_dim).reshape(N, -1)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        context: torch.Tensor,
        vector: torch.Tensor,
        num_frames: int,
    ) -> torch.Tensor:
        """x: (B*T, 8, h, w); c_noise: (B*T,); context: (B*T, 1, D); vector: (B*T, 3) raw values."""
        dtype = x.dtype
        emb = self.time_embed(timestep_embedding(c_noise, self.cfg.model_channels).to(dtype))
        emb = emb + self.label_emb(self.embed_vector(vector).to(dtype))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context, num_frames)
            hs.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for block in self.output_blocks:
            h = block(h, emb, context, num_frames, skip=hs.pop())
        return self.out(h)

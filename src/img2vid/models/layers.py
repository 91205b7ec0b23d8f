"""Building blocks shared by the UNet and the VAE. Names follow the reference checkpoint."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first (the reference's order). t: (N,) -> (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int, eps: float = 1e-5, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)


def channels_last(x: torch.Tensor) -> bool:
    """Whether x, (N, C, H, W) or (N, C, T, H, W), is stored with the channels innermost."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and x.shape[1] > 1 and x.is_contiguous(memory_format=fmt)


def cat_channels(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(tensors, dim=1), kept channels-last when the inputs are: compiled, a plain concatenation of
    channels-last tensors is stored in NCHW order, and the group norm after it then reads across strides."""
    if all(channels_last(t) for t in tensors):
        return torch.cat([t.movedim(1, -1) for t in tensors], dim=-1).movedim(-1, 1)
    return torch.cat(tensors, dim=1)


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v (the reference's CrossAttention)."""

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C); context: (Bc, M, D) with B a multiple of Bc (query rows b*k..b*k+k-1 use context b).

        With one context token (SVD's image embedding) the softmax over a single key is exactly 1, so every
        query gets the projected value: the result is (Bc, 1, C), to be broadcast by the caller. Exact, and it
        skips the query/key projections and the attention of every cross-attention layer."""
        if context is not None and context.shape[1] == 1:
            return self.to_out(self.to_v(context))
        if context is None:  # self-attention
            return self.to_out(self.self_attention(self.fused_qkv(x)))
        if context.shape[0] != x.shape[0]:
            context = context.repeat_interleave(x.shape[0] // context.shape[0], dim=0)
        return self.to_out(self.attend(self.to_q(x), self.to_k(context), self.to_v(context)))

    def self_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, N, 3C) fused [q, k, v] -> (B, N, C), heads side by side."""
        return self.attend(*qkv.chunk(3, dim=-1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, N, C = q.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(B, N, C)

    def fused_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[q, k, v] of self-attention in one matrix product, (..., 3C): x is read once, not three times."""
        return F.linear(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))


def cross_attend(attn: Attention, norm: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """attn(norm(x), context). With one context token the result does not depend on the queries (see
    Attention.forward), so the norm is not computed: torch.compile drops it anyway, eager mode saves a pass."""
    return attn(x if context.shape[1] == 1 else norm(x), context)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4x inner width. `net.1` is the reference's (no-op at inference) dropout."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MixFactor(nn.Module):
    """The learned blend of a spatial and a temporal branch: alpha = sigmoid(mix_factor)."""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, x_spatial: torch.Tensor, x_temporal: torch.Tensor) -> torch.Tensor:
        # "learned_with_images" with image_only_indicator all zero (video inference) reduces to this.
        alpha = torch.sigmoid(self.mix_factor).to(x_spatial.dtype)
        return alpha * x_spatial + (1 - alpha) * x_temporal

"""Building blocks shared by the UNet and the VAE. Names follow the reference checkpoint."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import flash_attention, frame_attention, gate_gemm, quack_geglu


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first (the reference's order). t: (N,) -> (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int, eps: float = 1e-5, groups: int = 32) -> GroupNorm:
    return GroupNorm(groups, channels, eps=eps)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same checkpoint names) that compiles well on channels-last tensors.

    Compiled, a channels-last input with fewer than FEW_ROWS (sample, group) pairs goes through
    `group_norm_channels_last`: the UNet's temporal norms (one row per group of each video: 64 rows for two
    videos) and the VAE decoder's (32 rows per frame, or per video in its temporal layers). On an H100 that made
    the UNet's temporal norms 2.8-5.4x faster and the decoder's full-resolution ones 2.6-2.9x (benchmarks/
    RESULTS.md, runs 25-27). With more rows, as in the UNet's per-frame norms (1600 for 50 frames), PyTorch's
    lowering was as fast, and keeping it there leaves Inductor's plan for the transformers as it was: the new
    form in their input norm changed it to one that held 1.1 GiB more. Eager mode: F.group_norm."""

    FEW_ROWS = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            torch.compiler.is_compiling()
            and channels_last(x)
            and x.shape[0] * self.num_groups < self.FEW_ROWS
        ):
            return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def channels_last(x: torch.Tensor) -> bool:
    """Whether x, (N, C, H, W) or (N, C, T, H, W), is stored with the channels innermost."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and x.shape[1] > 1 and x.is_contiguous(memory_format=fmt)


def cat_channels(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(tensors, dim=1), kept channels-last when the inputs are. Compiled, a plain concatenation of
    channels-last tensors was stored in NCHW order by Inductor, and the group norm after it read that across
    strides; concatenating along the last axis of the (N, H, W, C) views stores it channels-last. For the
    UNet's skip connections that made a UNet call 3.2% faster (benchmarks/RESULTS.md, run 27)."""
    if all(channels_last(t) for t in tensors):
        return torch.cat([t.movedim(1, -1) for t in tensors], dim=-1).movedim(-1, 1)
    return torch.cat(tensors, dim=1)


def group_norm_channels_last(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """F.group_norm for an (N, C, *spatial) tensor stored channels-last, in fp32, written for torch.compile.

    The generic lowering reduces each (sample, group) over a span that, in channels-last memory, is C/G
    channels out of every C: its loads are strided and its rows few (N*G), so on SVD-XT's shapes it ran far
    below the memory bandwidth. Here the mean and variance are taken per channel over the pixels (a reduction
    whose loads are contiguous across channels, with N*C rows) and then combined per group by the law of total
    variance, which is exact for groups of equally many elements: var = mean of the channel variances + the
    variance of the channel means. The normalisation is one multiply-add per element (x * scale + shift, as
    PyTorch's CUDA kernel does). Same result as F.group_norm up to float rounding."""
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
            qkv = self.fused_qkv(x)
            if flash_attention.applies(x, self.heads):  # FlashAttention-4 where installed: flash_attention.py
                return self.to_out(flash_attention.flash_attention(qkv, self.heads))
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            if context.shape[0] != x.shape[0]:
                context = context.repeat_interleave(x.shape[0] // context.shape[0], dim=0)
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        B, N, C = q.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        out = attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))

    def across_frames(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Self-attention over the frames of each pixel, for x: (B*T, S, C) stored frame by frame (video b's
        frame t is row b*T+t), with the frame attention kernel (frame_attention.applies must hold). The result
        is in the same order."""
        return self.to_out(frame_attention.frame_attention(self.fused_qkv(x), self.heads, num_frames))

    def fused_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[q, k, v] of self-attention in one matrix product, (..., 3C): x is read once, not three times."""
        return F.linear(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))


def cross_attend(attn: Attention, norm: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """attn(norm(x), context). With one context token the result does not depend on the queries (see
    Attention.forward), so the norm is not computed: torch.compile drops it anyway, eager mode saves a pass."""
    return attn(x if context.shape[1] == 1 else norm(x), context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d). On CUDA in half precision, sequences of at most 64 tokens
    (the temporal layers' 14-25 frames) take the memory-efficient kernel: at SVD-XT's shapes on an H200 it runs
    in 0.69x the time of the default (cuDNN) kernel, which is the faster one for the long spatial sequences
    (benchmarks/kernels.py, RESULTS.md)."""
    short = q.shape[-2] <= 64 and k.shape[-2] <= 64
    # Kept to what was measured and to the kernel's limits (CUDA's build, not ROCm's; 16-byte aligned heads; a
    # batch under 65536, as a CUDA grid dimension may hold, which 2048x2048 videos exceed), because the private
    # op, unlike F.scaled_dot_product_attention, does not fall back to another kernel on its own.
    supported = q.is_cuda and torch.version.hip is None and q.shape[-1] % 8 == 0 and q.shape[0] < 65536
    if short and supported and q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]
    return F.scaled_dot_product_attention(q, k, v)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)
        # the interleaved copy of proj that quack's GEMM reads, when quack_geglu.prepare gives one
        self.register_buffer("gated_weight", None, persistent=False)
        self.register_buffer("gated_bias", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if quack_geglu.applies(x, self.gated_weight):  # fp16, fast mode, where quack is installed
            return quack_geglu.geglu(x, self.gated_weight, self.gated_bias)
        if gate_gemm.applies(x, self.proj.weight):  # fp16 on a Hopper GPU, once enabled (see gate_gemm.py)
            return gate_gemm.geglu(x, self.proj.weight, self.proj.bias)
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

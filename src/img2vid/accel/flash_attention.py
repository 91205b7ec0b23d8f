"""flash_attention: the UNet's spatial self-attention through FlashAttention-4 (`pip install -e ".[fa4]"`).

The self-attention over the pixels of each frame (heads of 64 channels over 9216, 2304 and 576 tokens for SVD-XT)
is the largest attention of a UNet call. FlashAttention-4's Hopper forward (FlashAttention-3's warp-specialised
design, in NVIDIA's CUTLASS Python DSL, compiled on first use) beats cuDNN's kernel there; below MIN_TOKENS
cuDNN's was faster. Same mathematics as scaled_dot_product_attention. It reads q, k and v where the fused
projection wrote them and writes (B, N, C) as the output projection reads it: no copies either way.
"""

from __future__ import annotations

import torch

from ..models.layers import Attention
from ..models.unet import TransformerBlock
from . import dsl

NAME = "flash_attention"
PACKAGE = "flash-attn-4"
MIN_TOKENS = 512
HEAD_DIMS = (64, 128)

_attention = None  # flash_attn.cute.flash_attn_func, imported by apply: the DSL takes seconds to import


def unavailable(device: torch.device, dtype: torch.dtype, memory: str) -> str | None:
    return dsl.unavailable(PACKAGE, "flash_attn.cute", device, dtype)


def apply(pipe, report) -> None:
    global _attention
    from flash_attn.cute import flash_attn_func

    _attention = flash_attn_func
    for block in pipe.unet.modules():
        if isinstance(block, TransformerBlock):
            block.attn1.__class__ = FlashSelfAttention  # a subclass with no state of its own


class FlashSelfAttention(Attention):
    """Attention whose self-attention takes FlashAttention-4 for fp16 CUDA sequences of MIN_TOKENS or more."""

    def self_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        d = qkv.shape[-1] // (3 * self.heads)
        if qkv.is_cuda and qkv.dtype == torch.float16 and d in HEAD_DIMS and qkv.shape[-2] >= MIN_TOKENS:
            return flash_attention(qkv, self.heads)
        return super().self_attention(qkv)


@torch.library.custom_op("img2vid::flash_attention", mutates_args=())
def flash_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head. qkv: (B, N, 3C), the fused projection [q, k, v]; returns (B, N, C)."""
    B, N, C3 = qkv.shape
    if qkv.stride(-1) != 1 or qkv.stride(1) % 8 or qkv.data_ptr() % 16:  # the kernel's bulk copies need these
        qkv = qkv.contiguous()
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in qkv.chunk(3, dim=-1))  # (B, N, heads, d) views
    attention = _attention
    if attention is None:  # a compiled artifact loaded in a process that has not applied this path
        from flash_attn.cute import flash_attn_func as attention
    return attention(q, k, v)[0].reshape(B, N, C3 // 3)


@flash_attention.register_fake
def _(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3)

"""The UNet's spatial self-attention through FlashAttention-4's kernels, where the optional package is installed.

An SVD-XT UNet call spends ~73 ms of its ~0.37 s (H100, fp16) in the self-attention over the pixels of each
frame: heads of 64 channels over 9216, 2304 and 576 tokens. PyTorch's fastest kernel for them is cuDNN's
(one warpgroup, 64 x 128 tiles; 477 TFLOP/s at the first level). FlashAttention-4 (`pip install
flash-attn-4`, kernels written in NVIDIA's CUTLASS Python DSL and compiled on first use) has, for Hopper,
FlashAttention-3's design: a producer warp loading tiles with the bulk-copy engine and two consumer warpgroups
whose softmax overlaps the other's matrix products. On an H100 it took 0.88x cuDNN's time at 9216 tokens (540
TFLOP/s), 0.83x at 2304 and 0.87x at 576, with the same error against fp32 attention (benchmarks/
fa4_attention.py; RESULTS.md, run 56). At 144 tokens (the middle block) cuDNN's was faster (0.062 against
0.068 ms), so sequences shorter than MIN_TOKENS keep PyTorch's kernel. Importing the package took 10.7 s on a
fresh machine (run 58); `enable` pays that once per process.

Same mathematics as scaled_dot_product_attention: scores and softmax in fp32, the probabilities rounded to the
inputs' half precision for the product with v. It reads q, k and v where the fused projection wrote them and
writes (B, N, C) in the order the output projection reads, so no transposes either way.

Used in fp16 (the pipeline's default on CUDA; bf16 was not measured) on GPUs of compute capability 9.x
(Hopper, measured) and 10.x (datacenter Blackwell, the package's main target; not measured here), for heads of 64
or 128 channels, when the package imports and `enable` has been called (Pipeline.setup does, on CUDA);
otherwise PyTorch's attention runs. IMG2VID_FLASH_ATTENTION=0 turns it off. It is a torch.library custom op, so
torch.compile keeps it whole in the graph.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from . import runtime

log = logging.getLogger("img2vid")

SWITCH = "IMG2VID_FLASH_ATTENTION"  # "0": never use FlashAttention-4
PACKAGE = "flash-attn-4"
MIN_TOKENS = 512  # shorter sequences keep PyTorch's kernel (faster at 144 tokens on an H100, run 56)
HEAD_DIMS = (64, 128)

_enabled = False  # set by `enable`, read by `applies`; torch.compile guards on it
_attention = None  # flash_attn.cute.flash_attn_func, imported by `enable`: the DSL takes seconds to import


def installed() -> bool:
    try:  # imports the parent package flash_attn, which FlashAttention-2 also provides
        return importlib.util.find_spec("flash_attn.cute") is not None
    except Exception:  # flash_attn absent, or a FlashAttention-2 install that fails to import
        return False


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why FlashAttention-4 cannot run on this device and dtype; None if it can (as far as can be told without
    importing it)."""
    return runtime.dsl_kernel_unavailable_reason(SWITCH, PACKAGE, installed(), device, dtype)


def enable(device: torch.device, dtype: torch.dtype) -> str:
    """Use FlashAttention-4 for the spatial self-attention from now on if it can run on this device and dtype;
    returns what was decided, for logs and `img2vid doctor`. Once on, it stays on for the whole process, unless
    IMG2VID_FLASH_ATTENTION=0 is set before a later call; `applies` still checks each input."""
    global _enabled, _attention
    reason = unavailable_reason(device, dtype)
    if os.environ.get(SWITCH, "1") == "0":
        _enabled = False
    elif reason is None:
        try:
            from flash_attn.cute import flash_attn_func

            _attention = flash_attn_func
            _enabled = True
        except Exception as e:  # a broken install (its CUDA libraries): PyTorch's kernel, not a failure
            reason = f"import failed: {type(e).__name__}: {e}"
            log.warning("FlashAttention-4 not used: %s", reason)
    return "on" if reason is None else f"off: {reason}"


def applies(x: torch.Tensor, heads: int) -> bool:
    """Whether self-attention over x, (B, N, C) tokens in fp16 on CUDA, takes FlashAttention-4."""
    d = x.shape[-1] // heads
    return (
        _enabled
        and x.is_cuda
        and x.dtype == torch.float16
        and d * heads == x.shape[-1]
        and d in HEAD_DIMS
        and x.shape[-2] >= MIN_TOKENS
    )


@torch.library.custom_op("img2vid::flash_attention", mutates_args=())
def flash_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for each head. qkv: (B, N, 3C), the fused projection [q, k, v]; returns
    (B, N, C), heads side by side."""
    B, N, C3 = qkv.shape
    if qkv.stride(-1) != 1 or qkv.stride(1) % 8 or qkv.data_ptr() % 16:  # the kernel's bulk copies need these
        qkv = qkv.contiguous()
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in qkv.chunk(3, dim=-1))  # (B, N, heads, d) views
    attention = _attention
    if attention is None:  # called directly, without `enable`
        from flash_attn.cute import flash_attn_func as attention
    return attention(q, k, v)[0].reshape(B, N, C3 // 3)


@flash_attention.register_fake
def _(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3)

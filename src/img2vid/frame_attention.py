"""Self-attention across the frames of each pixel (the UNet's temporal layers), read where the tokens lie.

A temporal layer attends, for every pixel of a video, over that pixel's T frames. Its tokens arrive frame by
frame, (B*T, S, C) for S pixels; the reference, and the plain path here, transposes them into (B*S, T, C)
sequences for the layer's norms, feed-forwards and attention, and back afterwards. Only the attention needs the
sequences: everything else in the layer acts on each token alone. This Triton kernel reads each sequence's q, k
and v in place, T rows S apart in the fused q/k/v projection, and writes the result in the same frame order,
so the temporal layer runs with no transposes at all (models/unet.py, TemporalTransformerBlock).

One program computes one (sequence, head): the T x T scores in fp32 with the frames padded to a power of two
and masked, a softmax in fp32, and the weighted sum of v with the probabilities rounded to the inputs' half
precision for the matrix product (as FlashAttention and PyTorch's memory-efficient kernel do), divided by the
softmax's sum in fp32. Same result as scaled_dot_product_attention up to float rounding.

On an H100 it took 0.43 ms where PyTorch's memory-efficient kernel took 0.99 on the transposed sequences (the
first SVD-XT level, 2.75 TB/s), and made a whole generation 1.2% faster (benchmarks/RESULTS.md, runs 45-48).

It runs in fp16 (the pipeline's default on CUDA; bf16 keeps the plain path, as it was not measured) on CUDA GPUs
of compute capability 8.0 or more (only Hopper was measured), for at most MAX_FRAMES frames and heads of 16 to
128 channels (a power of two), when Triton and torch.library.triton_op (PyTorch 2.6) are there and `enable` has
been called (Pipeline.setup does, on CUDA); otherwise the plain path runs. IMG2VID_FRAME_ATTENTION=0 turns it
off. It is a torch.library.triton_op, so torch.compile sees the kernel and schedules it with the rest of the
graph.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os

import torch

log = logging.getLogger("img2vid")

SWITCH = "IMG2VID_FRAME_ATTENTION"  # "0": never use the kernel
MAX_FRAMES = 64

_enabled = False  # set by `enable`, read by `applies`; torch.compile guards on it
# The kernel and its op, built on first use: importing Triton and defining a triton_op takes seconds (it imports
# Inductor), which `import img2vid` should not pay where the kernel never runs.
_kernel = None
_op = None


def have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None  # PyTorch's CPU wheels come without it


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot run on this device and dtype; None if it can."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    if not have_triton():
        return "needs Triton"
    if not hasattr(torch.library, "triton_op"):
        return "needs PyTorch 2.6 or later"
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip is not None:
        return "needs a CUDA device"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "needs compute capability 8.0 or more"
    if dtype != torch.float16:
        return "needs float16"
    return None


def enable(device: torch.device, dtype: torch.dtype) -> str:
    """Use the kernel in the temporal layers from now on if it can run on this device and dtype; returns what
    was decided, for logs and `img2vid doctor`. Once on, it stays on for the whole process, unless
    IMG2VID_FRAME_ATTENTION=0 is set before a later call; `applies` still checks each input, so CPU and fp32
    pipelines beside it keep the plain path."""
    global _enabled
    reason = unavailable_reason(device, dtype)
    if os.environ.get(SWITCH, "1") == "0":
        _enabled = False
    elif reason is None:
        try:
            build()
            _enabled = True
        except Exception as e:  # a broken Triton install: the plain path, never a failed generation
            reason = f"Triton failed: {type(e).__name__}: {e}"
            log.warning("temporal attention kernel not used: %s", reason)
    return "on" if reason is None else f"off: {reason}"


def applies(x: torch.Tensor, heads: int, frames: int) -> bool:
    """Whether a temporal layer's self-attention over x, (B*T, S, C) in fp16 on CUDA, takes the kernel."""
    d = x.shape[-1] // heads
    return (
        _enabled
        and x.is_cuda
        and x.dtype == torch.float16
        and frames <= MAX_FRAMES
        and d * heads == x.shape[-1]
        and 16 <= d <= 128
        and d & (d - 1) == 0
    )


def frame_attention(qkv: torch.Tensor, heads: int, frames: int) -> torch.Tensor:
    """Attention over the frames of each pixel. qkv: (B*T, S, 3C), the fused projection [q, k, v] of frames
    stored one after the other (video b's frame t is row b*T+t); returns (B*T, S, C) in the same order."""
    op = _op if _op is not None else build()
    return op(qkv, heads, frames)


def build():
    """Define the Triton kernel and the op that launches it (once); returns the op."""
    global _kernel, _op
    if _op is not None:
        return _op
    import triton
    import triton.language as tl

    @triton.jit
    def frame_attention_kernel(
        QKV, O, S, T, C, stride_token, stride_out, scale, D: tl.constexpr, BLOCK_T: tl.constexpr
    ):
        seq = tl.program_id(0)  # b * S + s: pixel s of video b
        head = tl.program_id(1)
        b = seq // S
        s = seq - b * S
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, D)
        valid = t < T
        row = (b * T + t).to(tl.int64) * S + s  # frame t of the sequence: token row b*T+t, pixel s
        src = QKV + row[:, None] * stride_token + head * D + d[None, :]
        q = tl.load(src, mask=valid[:, None], other=0.0)
        k = tl.load(src + C, mask=valid[:, None], other=0.0)
        v = tl.load(src + 2 * C, mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        p = tl.exp(scores - tl.max(scores, 1)[:, None])
        out = tl.dot(p.to(v.dtype), v) / tl.sum(p, 1)[:, None]
        dst = O + row[:, None] * stride_out + head * D + d[None, :]
        tl.store(dst, out.to(O.dtype.element_ty), mask=valid[:, None])

    @torch.library.triton_op("img2vid::frame_attention", mutates_args=())
    def op(qkv: torch.Tensor, heads: int, frames: int) -> torch.Tensor:
        BT, S, C3 = qkv.shape
        C = C3 // 3
        if qkv.stride(-1) != 1 or qkv.stride(0) != S * qkv.stride(1):
            qkv = qkv.contiguous()
        out = qkv.new_empty(BT, S, C)
        d = C // heads
        grid = (BT // frames * S, heads)
        torch.library.wrap_triton(frame_attention_kernel)[grid](
            qkv, out, S, frames, C, qkv.stride(1), C, 1 / math.sqrt(d),
            D=d, BLOCK_T=max(16, triton.next_power_of_2(frames)), num_warps=4,
        )  # fmt: skip
        return out

    _kernel, _op = frame_attention_kernel, op
    return op

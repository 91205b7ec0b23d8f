"""A flash-attention forward in Triton against cuDNN's, for the UNet's spatial self-attention (GPU):

    python benchmarks/spatial_attention_triton.py --out $OUT

The five 9216-token spatial layers of an SVD-XT UNet call (CFG batch 2 x 25 frames, 5 heads of 64) take ~60 ms
in cuDNN's flash kernel, at ~445 TFLOP/s on an H100: the largest single item of a call. This times a plain
Triton flash-attention forward (online softmax in fp32 with exp2, the probabilities rounded to fp16 for the
product with v; no warp specialisation) over several tile shapes, on the UNet's own strided q/k/v views of one
fused projection, against F.scaled_dot_product_attention, with the error of each against fp32 attention on a
slice. An experiment: the library does not use it. Writes spatial_attention_triton.json to --out.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from img2vid import gate_gemm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

LEVELS = [(9216, 320, 5), (2304, 640, 10)]  # tokens per frame, channels, heads


@triton.jit
def flash_forward(
    Q, K, V, O, stride_b, stride_h, stride_n, stride_ob, stride_oh, stride_on, N, H, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh - b * H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    base = b.to(tl.int64) * stride_b + h * stride_h
    q = tl.load(Q + base + offs_m[:, None] * stride_n + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        if EVEN_N:
            k = tl.load(K + base + cols[None, :] * stride_n + offs_d[:, None])
            v = tl.load(V + base + cols[:, None] * stride_n + offs_d[None, :])
        else:
            k = tl.load(
                K + base + cols[None, :] * stride_n + offs_d[:, None], mask=cols[None, :] < N, other=0.0
            )
            v = tl.load(
                V + base + cols[:, None] * stride_n + offs_d[None, :], mask=cols[:, None] < N, other=0.0
            )
        s = tl.dot(q, k) * qk_scale  # log2 units
        if not EVEN_N:
            s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    ob = b.to(tl.int64) * stride_ob + h * stride_oh
    tl.store(
        O + ob + offs_m[:, None] * stride_on + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=offs_m[:, None] < N,
    )


def triton_attention(q, k, v, block_m, block_n, warps, stages):
    """q, k, v: (B, H, N, d) views sharing strides (the fused projection's); returns (B, N, H*d) contiguous."""
    B, H, N, d = q.shape
    out = torch.empty(B, N, H * d, device=q.device, dtype=q.dtype)
    o = out.view(B, N, H, d).transpose(1, 2)
    grid = (triton.cdiv(N, block_m), B * H)
    flash_forward[grid](
        q, k, v, o, q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2), N, H,
        1 / math.sqrt(d) * 1.4426950408889634, D=d, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=N % block_n == 0,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def time_ms(fn):
    return gate_gemm.time_ms(fn, n=10, warmup=2)


def measure(N: int, C: int, heads: int, dev) -> dict:
    B, d = 50, C // heads
    qkv = torch.randn(B, N, 3 * C, device=dev, dtype=torch.float16)
    q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    flop = 4 * B * heads * N * N * d
    r: dict = {}

    def cudnn():
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)

    r["cudnn_ms"] = time_ms(cudnn)
    ref = F.scaled_dot_product_attention(*(t[:2].float() for t in (q, k, v))).transpose(1, 2).reshape(2, N, C)

    def err(o):
        return ((o[:2].float() - ref).abs().max() / ref.abs().max()).item()

    r["cudnn_err"] = err(cudnn())
    for bm, bn, w, st in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 4),
                          (128, 32, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4), (256, 64, 8, 3)]:  # fmt: skip
        name = f"triton_m{bm}_n{bn}_w{w}_s{st}"
        try:
            r[f"{name}_ms"] = time_ms(
                lambda bm=bm, bn=bn, w=w, st=st: triton_attention(q, k, v, bm, bn, w, st)
            )
            r[f"{name}_err"] = err(triton_attention(q, k, v, bm, bn, w, st))
        except Exception as e:  # a shape that does not fit (shared memory, registers): note it and go on
            r[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return report.with_tflops(r, flop)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    report.levels(
        res,
        LEVELS,
        lambda N, C, heads: f"N{N}_C{C}",
        lambda N, C, heads: measure(N, C, heads, dev),
        Path(a.out, "spatial_attention_triton.json"),
    )


if __name__ == "__main__":
    main()

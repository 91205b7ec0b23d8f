"""FlashAttention-4's Hopper forward (the `flash-attn-4` package, CUTLASS DSL) against cuDNN's, for the UNet's
spatial self-attention (GPU; needs flash-attn-4 and its CUTLASS DSL libraries):
    python benchmarks/fa4_attention.py --out $OUT
cuDNN's kernel for these layers (one warpgroup, 64x128 tiles) takes ~73 ms of a 0.37 s SVD-XT UNet call on an
H100. FlashAttention-4's SM90 path is FlashAttention-3's design (a producer warp and two consumer warpgroups,
softmax overlapped with the matrix products) written in the CUTLASS DSL. This times it on the UNet's own
strided q/k/v views of one fused projection, at its default tile and a few others, against
F.scaled_dot_product_attention, with the error of each against fp32 attention on a slice. Writes
fa4_attention.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from img2vid import gate_gemm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

LEVELS = [
    (9216, 320, 5),
    (2304, 640, 10),
    (576, 1280, 20),
    (144, 1280, 20),
]  # tokens per frame, channels, heads
# (tile_m, tile_n, P in registers for the second product, intra-warpgroup overlap); None: the package's choice.
CONFIGS = [None, (192, 128, True, True), (128, 128, True, True), (192, 192, True, True), (128, 192, True, True),
           (192, 128, False, True), (192, 128, True, False)]  # fmt: skip


def time_ms(fn):
    return gate_gemm.time_ms(fn, n=10, warmup=2)


def measure(N: int, C: int, heads: int, dev) -> dict:
    from flash_attn.cute.interface import _flash_attn_fwd

    B, d = 50, C // heads
    qkv = torch.randn(B, N, 3 * C, device=dev, dtype=torch.float16)
    q, k, v = (t.unflatten(-1, (heads, d)) for t in qkv.chunk(3, dim=-1))  # (B, N, h, d), strided
    flop = 4 * B * heads * N * N * d
    r: dict = {}

    def cudnn():
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    r["cudnn_ms"] = time_ms(cudnn)
    ref = F.scaled_dot_product_attention(*(t[:2].float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def err(o):
        return ((o[:2].float() - ref).abs().max() / ref.abs().max()).item()

    r["cudnn_err"] = err(cudnn())
    for cfg in CONFIGS:
        name = "fa4_default" if cfg is None else "fa4_m{}_n{}_rs{:d}_ol{:d}".format(*cfg)
        kw = {} if cfg is None else dict(tile_mn=cfg[:2], mma_pv_is_rs=cfg[2], intra_wg_overlap=cfg[3])
        out = torch.empty(B, N, heads, d, device=dev, dtype=q.dtype)

        def fa4(kw=kw, out=out):
            _flash_attn_fwd(q, k, v, out=out, **kw)
            return out

        try:
            t0 = time.perf_counter()
            fa4()
            torch.cuda.synchronize()
            r[f"{name}_first_call_s"] = time.perf_counter() - t0  # includes the JIT compile
            r[f"{name}_ms"] = time_ms(fa4)
            r[f"{name}_err"] = err(fa4())
        except Exception as e:  # a configuration that does not build or fit: note it and go on
            r[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return report.with_tflops(r, flop)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    dev = torch.device("cuda")
    import flash_attn.cute as fa

    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "flash_attn_4": getattr(fa, "__version__", "?"),
    }
    print(json.dumps(res), flush=True)
    report.levels(
        res,
        LEVELS,
        lambda N, C, heads: f"N{N}_C{C}",
        lambda N, C, heads: measure(N, C, heads, dev),
        Path(a.out, "fa4_attention.json"),
    )


if __name__ == "__main__":
    main()

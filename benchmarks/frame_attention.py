"""The temporal layers' self-attention at each SVD-XT level, three ways (GPU):

    python benchmarks/frame_attention.py --out $OUT

- seqs: PyTorch's memory-efficient kernel on (B*S, heads, T, d) views of a (B*S, T, 3C) projection, as the
  temporal layers ran before (the tokens transposed to sequences around the whole layer, not counted here);
- plain: the plain path of Attention.across_frames on a (B*T, S, 3C) projection: copies to sequences, the same
  kernel, and the copy back;
- kernel: img2vid.frame_attention on the (B*T, S, 3C) projection in place, at several warp counts.

CFG batch 2 x 25 frames, 576x1024 (S = 9216, 2304, 576, 144 pixels per frame), fp16. Also the largest error of
each against fp32 attention, relative to the largest output. Writes frame_attention.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from img2vid import frame_attention as fa  # noqa: E402
from img2vid import gate_gemm  # noqa: E402
from img2vid.models.layers import attention  # noqa: E402

LEVELS = [(9216, 320, 5), (2304, 640, 10), (576, 1280, 20), (144, 1280, 20)]  # pixels, channels, heads


def time_ms(fn):
    return gate_gemm.time_ms(fn, n=20, warmup=3)


def launch(qkv, heads, T, warps):
    BT, S, C3 = qkv.shape
    C = C3 // 3
    out = qkv.new_empty(BT, S, C)
    d = C // heads
    fa.build()
    fa._kernel[(BT // T * S, heads)](
        qkv,
        out,
        S,
        T,
        C,
        qkv.stride(1),
        C,
        1 / math.sqrt(d),
        D=d,
        BLOCK_T=max(16, 1 << (T - 1).bit_length()),
        num_warps=warps,
    )
    return out


def measure(S: int, C: int, heads: int, T: int, B: int, dev: torch.device) -> dict:
    d = C // heads
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(B * T, S, 3 * C, device=dev, dtype=torch.float16, generator=g)
    # the same values as sequences: (B*S, T, 3C), as the projection was stored before
    qkv_seq = qkv.view(B, T, S, 3 * C).transpose(1, 2).reshape(B * S, T, 3 * C)

    def seqs():
        q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in qkv_seq.chunk(3, dim=-1))
        return attention(q, k, v).transpose(1, 2).reshape(B * S, T, C)

    def plain():  # Attention.across_frames without its projections
        q, k, v = qkv.view(B, T, S, 3, heads, d).permute(3, 0, 2, 4, 1, 5).reshape(3, B * S, heads, T, d)
        return attention(q, k, v).view(B, S, heads, T, d).permute(0, 3, 1, 2, 4).reshape(B * T, S, C)

    q, k, v = qkv.float().view(B, T, S, 3, heads, d).permute(3, 0, 2, 4, 1, 5).reshape(3, B * S, heads, T, d)
    ref = F.scaled_dot_product_attention(q, k, v).view(B, S, heads, T, d).permute(0, 3, 1, 2, 4)
    ref = ref.reshape(B * T, S, C)
    del q, k, v

    def err(o):
        return ((o.float() - ref).abs().max() / ref.abs().max()).item()

    r = {
        "seqs_ms": time_ms(seqs),
        "seqs_err": err(seqs().view(B, S, T, C).transpose(1, 2).reshape(B * T, S, C)),
        "plain_ms": time_ms(plain),
        "plain_err": err(plain()),
    }
    for w in (1, 2, 4, 8):
        r[f"kernel_w{w}_ms"] = time_ms(lambda w=w: launch(qkv, heads, T, w))
        r[f"kernel_w{w}_err"] = err(launch(qkv, heads, T, w))
    r["op_ms"] = time_ms(lambda: fa.frame_attention(qkv, heads, T))
    r["op_err"] = err(fa.frame_attention(qkv, heads, T))
    # the bandwidth the op reaches on what it must move: q, k and v read, the output written
    r["op_GBs"] = 4 * qkv.numel() / 3 * 2 / (r["op_ms"] / 1e3) / 1e9
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    dev = torch.device("cuda")
    print("kernel:", fa.enable(dev, torch.float16))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for S, C, heads in LEVELS:
        r = res[f"S{S}_C{C}"] = measure(S, C, heads, a.frames, 2, dev)
        print(S, C, json.dumps({k: round(v, 4) for k, v in r.items()}), flush=True)
    Path(a.out, "frame_attention.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

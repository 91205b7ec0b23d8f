"""Kernel-level measurements behind the fast mode's choices (GPU), at SVD-XT's full-size shapes
(CFG batch 2 x 25 frames, 576x1024 -> latent 72x128; levels of 9216, 2304 and 576 tokens).

    python benchmarks/kernels.py --out $OUT

- attention: each SDPA backend on the spatial self-attention (B*T, heads, tokens, 64) and the temporal one
  (B*tokens, heads, 25 frames, 64), fed the strided views the UNet makes, and the default backend on contiguous
  copies of them;
- geglu: the GEGLU projection of every level, unfused (cuBLAS GEMM, then the gate, both as torch.compile makes
  them) against the fused Triton kernel of geglu_triton.py (an experiment img2vid does not use), with its deviation from the fp32 result.
- gateddown: GEGLU's gate + the down projection of every level, compiled unfused against the Triton kernel of
  gated_down_triton.py (its gate as the GEMM's prologue), per tile configuration, with the deviation from fp32;
- tunable: the UNet's linear layers under cuBLAS's heuristics and under PyTorch's TunableOp;
- groupnorm: group norm + SiLU compiled, PyTorch's nn.GroupNorm against img2vid's GroupNorm (its channels-last
  formulation), on the channels-last tensors of the UNet's resblocks (per frame and temporal) and of the VAE
  decoder, with the bandwidth reached (one read and one write counted) and the deviation from fp32.
Writes kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gated_down_triton  # noqa: E402
import geglu_triton as kernels  # noqa: E402
from profile_unet import bench  # noqa: E402  (median of CUDA-event timings)

LEVELS = [(9216, 320, 5), (2304, 640, 10), (576, 1280, 20)]  # tokens per frame, channels, heads


def bench_ms(fn) -> float:
    return 1000 * bench(fn, n=20, warmup=3)


def attention(res: dict, dt: torch.dtype, frames: int, videos: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    for tokens, C, heads in LEVELS[:2]:
        for kind in ("spatial", "temporal"):
            batch, seq = (videos * frames, tokens) if kind == "spatial" else (videos * tokens, frames)
            qkv = torch.randn(batch, seq, 3 * C, device="cuda", dtype=dt)
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, -1))
            flop = 4 * batch * heads * seq * seq * (C // heads)
            ref = None
            contiguous = [t.contiguous() for t in (q, k, v)]  # (B, heads, N, d) each, not views of one buffer
            for name in ["default", "default_contiguous", *backends]:
                key = f"attn_{kind}_{tokens}_{name}"
                qkv_in = contiguous if name == "default_contiguous" else (q, k, v)

                def fn(qkv_in=qkv_in, b=backends.get(name)):
                    if b is None:
                        return F.scaled_dot_product_attention(*qkv_in)
                    with sdpa_kernel([b]):
                        return F.scaled_dot_product_attention(*qkv_in)

                try:
                    out = fn()
                    ms = bench_ms(fn)
                    ref = out if ref is None else ref
                    res[key] = {
                        "ms": ms,
                        "TFLOPs": flop / ms / 1e9,
                        "max_diff_vs_default": (out - ref).abs().max().item(),
                    }
                except Exception as e:  # a backend may refuse a shape or layout
                    res[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(key, res[key], flush=True)
            del qkv, q, k, v, contiguous, qkv_in
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        tokens, C, heads = LEVELS[0]
        qkv = torch.randn(videos * frames, tokens, 3 * C, device="cuda", dtype=dt)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, -1))
        F.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()
    res["attn_default_kernels"] = [e.key for e in prof.key_averages()][:5]


def geglu(res: dict, dt: torch.dtype, frames: int, videos: int) -> None:
    unfused = torch.compile(kernels.geglu_reference, fullgraph=True, dynamic=False)
    for tokens, C, _ in LEVELS:
        M = videos * frames * tokens
        x = torch.randn(M, C, device="cuda", dtype=dt)
        w = torch.randn(8 * C, C, device="cuda", dtype=dt) / C**0.5
        b = torch.randn(8 * C, device="cuda", dtype=dt) * 0.1
        flop = 2 * M * C * 8 * C
        ref32 = kernels.geglu_reference(x[:4096].float(), w.float(), b.float())
        row = {}
        for name, f in [
            ("eager", kernels.geglu_reference),
            ("compiled_unfused", unfused),
            ("fused_triton", kernels.geglu_linear),
            ("fused_tma", kernels.geglu_linear_tma_or_reference),
        ]:

            def fn(f=f, x=x, w=w, b=b):
                return f(x, w, b)

            out = fn()
            ms = bench_ms(fn)
            row[name] = {
                "ms": ms,
                "TFLOPs": flop / ms / 1e9,
                "max_abs_err_vs_fp32": (out[:4096].float() - ref32).abs().max().item(),
                "mean_abs_err_vs_fp32": (out[:4096].float() - ref32).abs().mean().item(),
            }
        res[f"geglu_M{M}_C{C}"] = row
        print(f"geglu M={M} C={C}", json.dumps(row), flush=True)
        del x, w, b


def gateddown(res: dict, dt: torch.dtype, frames: int, videos: int) -> None:
    """GEGLU gate + down projection: compiled unfused (Inductor's gate kernel, then cuBLAS) against the Triton
    kernel of gated_down_triton.py with each of its tile configurations and with Triton's autotuning."""
    unfused = torch.compile(gated_down_triton.gated_down_reference, fullgraph=True, dynamic=False)
    for tokens, C, _ in LEVELS + [(144, 1280, 20)]:
        M, H = videos * frames * tokens, 4 * C
        hg = torch.randn(M, 2 * H, device="cuda", dtype=dt)
        w = torch.randn(C, H, device="cuda", dtype=dt) / H**0.5
        b = torch.randn(C, device="cuda", dtype=dt) * 0.1
        flop = 2 * M * H * C
        ref32 = gated_down_triton.gated_down_reference(hg[:4096].float(), w.float(), b.float())
        fns = [("compiled_unfused", unfused), ("triton_autotuned", gated_down_triton.gated_down)]
        fns += [
            (f"triton_{'_'.join(map(str, c))}", lambda h, w, b, c=c: gated_down_triton.gated_down(h, w, b, c))
            for c in gated_down_triton.CONFIGS
        ]
        row = {}
        for name, f in fns:

            def fn(f=f, hg=hg, w=w, b=b):
                return f(hg, w, b)

            try:
                out = fn()
                ms = bench_ms(fn)
            except Exception as e:  # a tile may not fit the shared memory
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
                continue
            row[name] = {
                "ms": ms,
                "TFLOPs": flop / ms / 1e9,
                "max_abs_err_vs_fp32": (out[:4096].float() - ref32).abs().max().item(),
                "mean_abs_err_vs_fp32": (out[:4096].float() - ref32).abs().mean().item(),
            }
        best = getattr(gated_down_triton._autotuned, "best_config", None)
        row["autotuned_config"] = str(best)
        res[f"gateddown_M{M}_H{H}_N{C}"] = row
        print(f"gateddown M={M} H={H} N={C}", json.dumps(row), flush=True)
        del hg, w, b


def tunable(res: dict, dt: torch.dtype, frames: int, videos: int) -> None:
    """The UNet's linear layers (with bias, as addmm) under cuBLAS's default heuristics, then under PyTorch's
    TunableOp, which times the candidates it has for each shape on first use and keeps the fastest (for a GEMM
    with a bias, torch 2.11 offers it only its default: RESULTS.md, run 34)."""
    shapes = []
    for tokens, C, _ in LEVELS:
        M = videos * frames * tokens
        shapes += [(M, C, 3 * C), (M, C, C), (M, C, 8 * C), (M, 4 * C, C)]
    rows = {}
    for tuned in (False, True):
        torch.cuda.tunable.enable(tuned)
        torch.cuda.tunable.tuning_enable(tuned)
        torch.cuda.tunable.set_filename(str(Path(os.environ.get("OUT", "/tmp"), "tunableop.csv")))
        for M, K, N in shapes:
            x = torch.randn(M, K, device="cuda", dtype=dt)
            w = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5
            b = torch.randn(N, device="cuda", dtype=dt)
            ms = bench_ms(lambda x=x, w=w, b=b: F.linear(x, w, b))
            key = f"M{M}_K{K}_N{N}"
            rows.setdefault(key, {})["tunableop" if tuned else "default"] = {
                "ms": ms,
                "TFLOPs": 2 * M * K * N / ms / 1e9,
            }
            print("tunable", key, rows[key], flush=True)
            del x, w, b
    torch.cuda.tunable.enable(False)
    res["tunableop_linear"] = rows


GN_SHAPES = [  # (name, shape, eps); 4-D tensors are channels-last, 5-D ones (N, C, T, H, W) channels-last-3d
    ("unet_l0", (50, 320, 72, 128), 1e-5),
    ("unet_l0_cat", (50, 640, 72, 128), 1e-5),
    ("unet_l0_temporal", (2, 320, 25, 72, 128), 1e-5),
    ("unet_l1", (50, 640, 36, 64), 1e-5),
    ("unet_l1_temporal", (2, 640, 25, 36, 64), 1e-5),
    ("unet_l2", (50, 1280, 18, 32), 1e-5),
    ("vae_576x1024", (14, 128, 576, 1024), 1e-6),
    ("vae_576x1024_temporal", (1, 128, 14, 576, 1024), 1e-6),
    ("vae_288x512", (14, 256, 288, 512), 1e-6),
    ("vae_144x256", (14, 512, 144, 256), 1e-6),
]


def groupnorm(res: dict, dt: torch.dtype, frames: int, videos: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from img2vid.models.layers import GroupNorm

    for name, shape, eps in GN_SHAPES:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = torch.randn(shape, device="cuda", dtype=dt).mul_(2).add_(0.5).contiguous(memory_format=fmt)
        w = torch.empty(shape[1], device="cuda", dtype=dt).uniform_(0.5, 1.5)
        b = torch.empty(shape[1], device="cuda", dtype=dt).uniform_(-0.5, 0.5)
        ref = F.silu(F.group_norm(x.float(), 32, w.float(), b.float(), eps))
        row = {}
        for label, cls in (("stock", torch.nn.GroupNorm), ("img2vid", GroupNorm)):
            torch._dynamo.reset()
            gn = cls(32, shape[1], eps=eps).to("cuda", dt)
            gn.load_state_dict({"weight": w, "bias": b})
            f = torch.compile(lambda t, gn=gn: F.silu(gn(t)), fullgraph=True, dynamic=False)
            with torch.no_grad():
                out = f(x)
                ms = bench_ms(lambda f=f, x=x: f(x))
            row[label] = {
                "ms": ms,
                "GBps_read_write": 2 * x.numel() * x.element_size() / ms / 1e6,
                "max_abs_err_vs_fp32": (out.float() - ref).abs().max().item(),
                "out_channels_last": out.is_contiguous(memory_format=fmt),
            }
            del out
        res[f"groupnorm_{name}"] = row
        print(f"groupnorm {name} {shape}", json.dumps(row), flush=True)
        del x, ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="attention,geglu")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": a.dtype}
    parts = {
        "attention": attention,
        "geglu": geglu,
        "groupnorm": groupnorm,
        "gateddown": gateddown,
        "tunable": tunable,
    }
    for part in a.parts.split(","):
        parts[part](res, dt, frames=25, videos=2)
        Path(a.out, "kernels.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

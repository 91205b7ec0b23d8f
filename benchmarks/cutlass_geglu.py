"""GEGLU's gate in a CUTLASS GEMM epilogue (img2vid/gate_gemm.py, .cu), per level of SVD-XT's UNet (H100/H200).

    python benchmarks/cutlass_geglu.py --out $OUT        # builds the kernel with nvcc first if needed

For each level's GEGLU (CFG batch 2 x 25 frames): the compiled unfused path (cuBLAS GEMM writing the 8C-wide
[a, g], then Inductor's gate kernel), cuBLAS alone, the fused kernel under every tile configuration and tile
order (swizzle 1/2/4/8, raster heuristic/along M/along N), and the pipeline's op (cuBLAS for a, then the fused
kernel at the configuration it picks); ms, TFLOP/s and the error against fp32. Writes cutlass_geglu.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from geglu_triton import geglu_reference  # noqa: E402
from profile_unet import bench  # noqa: E402  (median of CUDA-event timings)

from img2vid import gate_gemm  # noqa: E402

LEVELS = [(9216, 320), (2304, 640), (576, 1280)]  # tokens per frame, channels
SCHEDULES = [(swizzle, raster) for swizzle in (1, 2, 4, 8) for raster in (0, 1, 2)]


def ms(fn) -> float:
    return 1000 * bench(fn, n=20, warmup=3)


def level(M: int, C: int, unfused) -> dict:
    dt, N = torch.float16, 4 * C
    x = torch.randn(M, C, device="cuda", dtype=dt)
    w = torch.randn(2 * N, C, device="cuda", dtype=dt) / C**0.5
    b = torch.randn(2 * N, device="cuda", dtype=dt) * 0.1
    ref32 = geglu_reference(x[:4096].float(), w.float(), b.float())
    row: dict = {}

    def record(name, fn, flop=2 * M * C * 2 * N):
        out = fn()
        t = ms(fn)
        row[name] = {"ms": round(t, 4), "TFLOPs": round(flop / t / 1e9, 1)}
        if name in ("compiled_unfused", "pipeline_op"):  # the whole GEGLU
            err = (out[:4096].float() - ref32).abs()
            row[name] |= {"max_abs_err_vs_fp32": err.max().item(), "mean_abs_err_vs_fp32": err.mean().item()}

    w_a, b_a, w_g, b_g = w[:N], b[:N], w[N:], b[N:]
    record("compiled_unfused", lambda: unfused(x, w, b))
    record("cublas_gemm_8C_only", lambda: F.linear(x, w, b))
    record("cublas_gemm_a_only", lambda: F.linear(x, w_a, b_a), flop=2 * M * C * N)
    a, out = F.linear(x, w_a, b_a), torch.empty(M, N, device="cuda", dtype=dt)
    times = {}
    for config in range(gate_gemm.configs()):
        for swizzle, raster in SCHEDULES:
            if gate_gemm.launch(config, x, w_g, b_g, a, out, swizzle, raster) == 0:
                times[(config, swizzle, raster)] = round(
                    gate_gemm.time_ms(
                        lambda c=config, s=swizzle, r=raster: gate_gemm.launch(c, x, w_g, b_g, a, out, s, r)
                    ),
                    4,
                )
    row["gate_kernel_ms_by_config_swizzle_raster"] = {
        str(k): v for k, v in sorted(times.items(), key=lambda kv: kv[1])
    }
    record("gate_kernel_only_as_picked", lambda: gate_gemm.gate_gemm(x, w_g, b_g, a), flop=2 * M * C * N)
    record("pipeline_op", lambda: torch.ops.img2vid.geglu_gate_gemm(x, w, b))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.float16
    t = time.perf_counter()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["kernel"] = gate_gemm.enable(dev, dt)
    res["enable_s"] = time.perf_counter() - t  # building it with nvcc, unless already built
    print("fused GEGLU kernel:", res["kernel"], flush=True)
    unfused = torch.compile(geglu_reference, fullgraph=True, dynamic=False)
    for tokens, C in LEVELS:
        row = level(50 * tokens, C, unfused)
        res[f"geglu_M{50 * tokens}_C{C}"] = row
        print(
            f"M={50 * tokens} C={C}",
            json.dumps({k: v for k, v in row.items() if "by_config" not in k}),
            flush=True,
        )
    # A temporal layer's input is a permuted view: the op must keep its memory order and match the reference.
    x = torch.randn(2, 25, 64, 320, device="cuda", dtype=dt).transpose(
        1, 2
    )  # (B, S, T, C) view of (B, T, S, C)
    w = torch.randn(2560, 320, device="cuda", dtype=dt) / 320**0.5
    b = torch.randn(2560, device="cuda", dtype=dt) * 0.1
    out = torch.ops.img2vid.geglu_gate_gemm(x, w, b)
    ref = geglu_reference(x.float(), w.float(), b.float())
    res["permuted_input"] = {
        "max_abs_err_vs_fp32": (out.float() - ref).abs().max().item(),
        "stride": out.stride(),
        "same_memory_order_as_input": out.stride()[1] < out.stride()[2],
    }
    print("permuted", res["permuted_input"], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cutlass_geglu.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

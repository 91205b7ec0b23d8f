"""GEGLU through quack's one-GEMM gated kernels (`quack-kernels`, Tri Dao's CUTLASS-DSL GEMMs) against img2vid's
CUTLASS kernel, per UNet level (GPU):
    python benchmarks/quack_geglu.py --out $OUT            # --residual: also gemm_add (run 66's experiment)

At the first level a GEGLU took ~2.05 ms with img2vid's CUTLASS path (cuBLAS for a = x W_a^T + b_a, then a
kernel for a * gelu(x W_g^T + b_g)) where its products need ~0.95 ms at the card's peak. quack's `gemm_gated`
computes both halves in one Hopper GEMM (weights interleaved gate/up) with the gated activation in its
epilogue, where the activation's cost shows. Timed here: the library's op (img2vid/quack_geglu.py: the erf GELU
as a degree-7 polynomial of |x| under one exp2, autotuned), and in quack's default tile configuration the same
polynomial at degrees 6, 7 and 9, quack's tanh-form GEGLU (not SVD's GELU) and quack's erf GELU (the general
erf). Each with its error against fp32. Writes quack_geglu.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from img2vid import gate_gemm, quack_geglu  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gelu_fit  # noqa: E402
import report  # noqa: E402

LEVELS = [(460800, 320), (115200, 640), (28800, 1280)]  # tokens (CFG batch 2 x 25 frames), channels


def time_ms(fn):
    return gate_gemm.time_ms(fn, n=10, warmup=2)


def register_quack_erf() -> str:
    """quack's own erf GELU (the general erf) as a gated activation, for comparison with img2vid's."""
    import quack.activation as qa
    import quack.gemm_interface as gi

    @qa.dsl_user_op
    def geglu_erf(x, y, *, loc=None, ip=None):
        if qa.const_expr(not isinstance(x, tuple)):
            return qa.gelu_erf(x) * y
        return qa.cute.arch.mul_packed_f32x2(qa.gelu_erf(x), y)

    qa.gate_fn_map["geglu_erf"] = geglu_erf
    gi.gated_to_pytorch_fn_map["geglu_erf"] = lambda gate, up: F.gelu(gate) * up
    return "geglu_erf"


def first(fn):
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def measure(M: int, C: int, dev, activations: list[str], residual: bool = False) -> dict:
    from quack.gemm_interface import gemm_add, gemm_gated

    r: dict = {}
    x = torch.randn(M, C, device=dev, dtype=torch.float16)
    w = torch.randn(8 * C, C, device=dev, dtype=torch.float16) / C**0.5  # GEGLU's proj: [W_a; W_g]
    b = torch.randn(8 * C, device=dev, dtype=torch.float16) * 0.1
    rows = slice(0, 4096)
    a_ref, g_ref = F.linear(x[rows].float(), w.float(), b.float()).chunk(2, dim=-1)
    ref = a_ref * F.gelu(g_ref)

    def err(out):
        return ((out[rows].float() - ref).abs().max() / ref.abs().max()).item()

    r["img2vid_ms"] = time_ms(lambda: gate_gemm.geglu(x, w, b))
    r["img2vid_err"] = err(gate_gemm.geglu(x, w, b))
    w_int, b_int = quack_geglu.interleave(w, b)  # B = w_int.t(): (K, 2N), gate and up columns interleaved
    out, r["quack_img2vid_first_s"] = first(lambda: quack_geglu.geglu(x, w_int, b_int))  # the library's op
    r["quack_img2vid_ms"] = time_ms(lambda: quack_geglu.geglu(x, w_int, b_int))
    r["quack_img2vid_err"] = err(out)
    for act in activations:  # quack's default tile configuration, to compare the activations' cost
        name = f"quack_{act.removeprefix('img2vid_geglu_erf_')}_default"
        try:

            def run(act=act):
                B = w_int.t()
                return gemm_gated(x, B, bias=b_int, activation=act, store_preact=False, tuned=False)[1]

            out, r[f"{name}_first_s"] = first(run)
            r[f"{name}_ms"] = time_ms(run)
            r[f"{name}_err"] = err(out)
        except Exception as e:  # note it and go on
            r[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    # a residual add and a bias in the epilogue: the attention output projection (C -> C) and the feed-forward's
    # down projection (4C -> C)
    for k_mult in (1, 4) if residual else ():
        K = k_mult * C
        h = torch.randn(M, K, device=dev, dtype=torch.float16)
        wo = torch.randn(C, K, device=dev, dtype=torch.float16) / K**0.5
        bo = torch.randn(C, device=dev, dtype=torch.float16) * 0.1
        res = torch.randn(M, C, device=dev, dtype=torch.float16)
        ref_o = F.linear(h[rows].float(), wo.float(), bo.float()) + res[rows].float()
        tag = f"add_K{K}"
        r[f"{tag}_torch_ms"] = time_ms(lambda h=h, wo=wo, bo=bo, res=res: F.linear(h, wo, bo) + res)
        for tuned in (False, True):
            name = f"{tag}_quack_{'tuned' if tuned else 'default'}"
            try:

                def run(h=h, wo=wo, bo=bo, res=res, tuned=tuned):
                    return gemm_add(h, wo.t(), res, bias=bo, tuned=tuned)

                out, r[f"{name}_first_s"] = first(run)
                r[f"{name}_ms"] = time_ms(run)
                r[f"{name}_err"] = ((out[rows].float() - ref_o).abs().max() / ref_o.abs().max()).item()
            except Exception as e:
                r[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--residual", action="store_true", help="also gemm_add against F.linear and an add")
    a = ap.parse_args()
    dev = torch.device("cuda")
    print("fused GEGLU kernel:", gate_gemm.enable(dev, torch.float16), flush=True)
    print("quack GEGLU:", quack_geglu.enable(dev, torch.float16), flush=True)
    # quack's tanh GELU and general erf, and img2vid's erf polynomial of degree 7 (the library's), 6 and 9
    activations = ["geglu", register_quack_erf()]
    activations += [quack_geglu.register(gelu_fit.fit(d)) for d in (7, 6, 9)]
    print("activations:", activations, flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report.levels(
        res,
        LEVELS,
        lambda M, C: f"M{M}_C{C}",
        lambda M, C: measure(M, C, dev, activations, residual=a.residual),
        Path(a.out, "quack_geglu.json"),
    )


if __name__ == "__main__":
    main()

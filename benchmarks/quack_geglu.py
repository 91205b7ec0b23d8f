"""GEGLU and residual-add GEMMs from quack (`quack-kernels`, Tri Dao's CUTLASS-DSL kernels) against img2vid's
(GPU; an experiment, the library does not use it):
    python benchmarks/quack_geglu.py --out $OUT

The GEGLU feed-forwards are the largest excess left in an SVD-XT UNet call: at the first level one takes
~2.25-2.5 ms (cuBLAS for a = x W_a^T + b_a, then img2vid's CUTLASS kernel for a * gelu(x W_g^T + b_g)) where
its products need ~0.95 ms at the card's peak. quack's `gemm_gated` computes both halves in one Hopper GEMM
(weights interleaved gate/up by column) with the gated activation in an epilogue overlapped with the next
tile's products. Its "geglu" uses the tanh approximation of GELU; SVD's is the erf form, so this also registers
"geglu_erf" (quack's own gelu_erf) and reports the error of each against fp32. `gemm_add` is the same GEMM
with a residual and a bias added in its epilogue, against F.linear and an add. Writes quack_geglu.json.
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
from img2vid import gate_gemm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

LEVELS = [(460800, 320), (115200, 640), (28800, 1280)]  # tokens (CFG batch 2 x 25 frames), channels


def time_ms(fn):
    return gate_gemm.time_ms(fn, n=10, warmup=2)


def register_geglu_erf():
    """quack's gated activations are looked up by name; add the erf-GELU one SVD uses. Also lets quack's
    compile-cache key take the ContextVar that the CUTLASS DSL 4.8.1's op decorator refers to (run 66 failed on
    it): keyed by its name, as it holds only source-location transforms, not the kernel's math."""
    import contextvars

    import quack.activation as qa
    import quack.gemm_interface as gi
    import quack.gemm_runtime.identity as identity

    plain_key = identity.semantic_value_key

    def semantic_value_key(value, seen):
        if isinstance(value, contextvars.ContextVar):
            return ("contextvar", value.name)
        try:
            return plain_key(value, seen)
        except TypeError:  # e.g. code.co_positions, which the DSL's wrappers also refer to: keyed by repr
            return ("opaque", type(value).__qualname__, repr(value))

    identity.semantic_value_key = semantic_value_key  # the module's own recursion looks it up by name

    @qa.dsl_user_op
    def geglu_erf(x, y, *, loc=None, ip=None):
        if qa.const_expr(not isinstance(x, tuple)):
            return qa.gelu_erf(x) * y
        return qa.cute.arch.mul_packed_f32x2(qa.gelu_erf(x), y)

    qa.gate_fn_map["geglu_erf"] = geglu_erf
    gi.gated_to_pytorch_fn_map["geglu_erf"] = lambda gate, up: F.gelu(gate) * up


def first(fn):
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def measure(M: int, C: int, dev, residual: bool = True) -> dict:
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
    # quack: B (K, 2N) with the gate and up columns interleaved: [g0, a0, g1, a1, ...]
    wa, wg = w.chunk(2)
    ba, bg = b.chunk(2)
    w_int = torch.stack([wg, wa], dim=1).reshape(8 * C, C)
    b_int = torch.stack([bg, ba], dim=1).reshape(8 * C)
    B = w_int.t()  # (K, 2N), a view of the Linear-style weight
    for act in ("geglu", "geglu_erf"):
        for tuned in (False, True):
            name = f"quack_{act}_{'tuned' if tuned else 'default'}"
            try:

                def run(act=act, tuned=tuned):
                    return gemm_gated(x, B, bias=b_int, activation=act, store_preact=False, tuned=tuned)[1]

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
    ap.add_argument("--no-residual", action="store_true", help="only the GEGLU kernels")
    a = ap.parse_args()
    dev = torch.device("cuda")
    print("fused GEGLU kernel:", gate_gemm.enable(dev, torch.float16), flush=True)
    register_geglu_erf()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report.levels(
        res,
        LEVELS,
        lambda M, C: f"M{M}_C{C}",
        lambda M, C: measure(M, C, dev, residual=not a.no_residual),
        Path(a.out, "quack_geglu.json"),
    )


if __name__ == "__main__":
    main()

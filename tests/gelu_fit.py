"""Fits the polynomial behind img2vid's erf GELU for fused GEMM epilogues (src/img2vid/accel/quack_geglu.py); CPU only:
    python tests/gelu_fit.py --degree 9

With Phi the standard normal CDF and s = |x|, the epilogue computes
    Phi(-s) = 2 ** p(s),   p(s) = -1 + c1 s + c2 s^2 + ... + cn s^n   (p(0) = log2(1/2) exactly)
    gelu(x) = x Phi(x) = max(x, 0) - s Phi(-s)
which needs one exp2 and n fused multiply-adds and no division or branch, and keeps the negative tail's
relative accuracy (torch's 0.5 x (1 + erf(x / sqrt 2)) loses it to cancellation). The coefficients minimise the
largest error of p on [0, S] (Lawson's iteratively reweighted least squares, float64; the reference is math.erfc).
Beyond S the polynomial is not clamped: the check below asks that it keep s 2^p(s) <= S 2^p(S) (= 1.1e-8 for
S = 5.9) up to |x| = 65504, fp16's largest value, so that gelu(x) stays within that of 0 (x < -S) or of x (x > S).
Prints the coefficients and the errors of the float32 evaluation against float64 GELU.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

FIT_RANGE = 5.9  # S: Phi(-5.9) = 1.8e-9


def target(s: np.ndarray) -> np.ndarray:
    return np.array([math.log2(0.5 * math.erfc(v / math.sqrt(2))) for v in s])


def fit(
    degree: int, fit_range: float = FIT_RANGE, points: int = 6001, iterations: int = 400
) -> tuple[float, ...]:
    """(c1, ..., cn): minimax p(s) + 1 on [0, fit_range] through the origin, rounded to float32."""
    s = (1 - np.cos(np.linspace(0, math.pi, points))) * fit_range / 2  # Chebyshev-spaced nodes
    y = target(s) + 1.0
    u = s / fit_range  # fit in [0, 1] for conditioning, then rescale
    basis = np.stack([u**k for k in range(1, degree + 1)], 1)
    w = np.full(points, 1.0 / points)
    for _ in range(iterations):
        root = np.sqrt(w)
        c, *_ = np.linalg.lstsq(basis * root[:, None], y * root, rcond=None)
        w = w * np.abs(basis @ c - y)
        w /= w.sum()
    return tuple(float(np.float32(v)) for v in c / fit_range ** np.arange(1, degree + 1))


def gelu_float32(x: np.ndarray, coeffs: tuple[float, ...]) -> np.ndarray:
    """The epilogue's arithmetic in float32 (fused multiply-adds rounded once, as on the GPU)."""
    f32 = np.float32
    x = x.astype(f32)
    s = np.abs(x)
    p = np.full_like(s, f32(coeffs[-1]))
    for c in (*coeffs[-2::-1], -1.0):
        p = (p.astype(np.float64) * s + c).astype(f32)
    with np.errstate(under="ignore"):
        tail = np.exp2(p.astype(np.float64)).astype(f32)
    return (-(s.astype(np.float64)) * tail + np.maximum(x, f32(0))).astype(f32)


def errors(coeffs: tuple[float, ...]) -> dict[str, float]:
    """Errors of the float32 evaluation against float64 GELU on [-12, 12], and the largest s 2^p(s) beyond the
    fitted range (up to fp16's largest value)."""
    x = np.concatenate([np.linspace(-12, 12, 240001), np.linspace(-0.01, 0.01, 2001)]).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x64])
    err = np.abs(gelu_float32(x, coeffs).astype(np.float64) - ref)
    rel = err / np.maximum(np.abs(ref), 1e-300)
    s = np.linspace(FIT_RANGE, 65504, 2_000_001)
    with np.errstate(over="ignore"):
        p = np.polynomial.polynomial.polyval(s, (-1.0, *coeffs))
    return {
        "max_abs_over_max_1_x": float((err / np.maximum(1.0, np.abs(x64))).max()),
        "max_rel_where_gelu_over_1e-6": float(rel[np.abs(ref) > 1e-6].max()),
        "max_tail_beyond_fit_range": float(np.max(s * np.exp2(np.minimum(p, 0)))),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--degree", type=int, default=7)
    a = ap.parse_args()
    coeffs = fit(a.degree)
    print("coefficients c1..cn:", coeffs)
    print(errors(coeffs))


if __name__ == "__main__":
    main()

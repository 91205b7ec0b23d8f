"""GEGLU as one quack GEMM (img2vid/quack_geglu.py), on the CPU: the erf-GELU polynomial against float64, the
interleaved weights, and the custom op's wiring with a stand-in for quack's gemm_gated (the real kernel needs a
GPU: benchmarks/quack_geglu.py and bench.py measure it there)."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from img2vid import quack_geglu
from img2vid.models.layers import GEGLU


def _load_fit_script():
    """benchmarks/gelu_fit.py as a module of its own name, without putting benchmarks/ on sys.path (where its
    other files would shadow installed packages for every later test)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gelu_fit.py"
    spec = importlib.util.spec_from_file_location("img2vid_gelu_fit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gelu_fit = _load_fit_script()


def erf_gelu64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * torch.special.erfc(-x / math.sqrt(2))


def test_polynomial_gelu_is_within_its_stated_error_of_float64():
    x = torch.cat([torch.linspace(-12, 12, 240_001), torch.linspace(-0.01, 0.01, 2001)])
    ref = erf_gelu64(x)
    err = (quack_geglu.gelu(x).double() - ref).abs()
    assert (err / x.double().abs().clamp(min=1)).max() < 1e-6  # 6.7e-7 with fused multiply-adds
    big = ref.abs() > 1e-6
    assert (err[big] / ref[big].abs()).max() < 1e-5  # relative, also in the negative tail
    # torch's own float32 GELU loses the tail to cancellation; the polynomial does not
    tail = (x < -4) & (x > -5.5)  # the fitted range; beyond it only the absolute error is small
    torch_rel = ((F.gelu(x[tail]).double() - ref[tail]).abs() / ref[tail].abs()).max()
    poly_rel = ((quack_geglu.gelu(x[tail]).double() - ref[tail]).abs() / ref[tail].abs()).max()
    assert poly_rel < torch_rel / 10


def test_polynomial_gelu_beyond_the_fitted_range_and_nan():
    x = torch.tensor([-65504.0, -1000.0, -20.0, -6.0, 6.0, 20.0, 1000.0, 65504.0])
    out = quack_geglu.gelu(x).double()
    assert torch.all((out - erf_gelu64(x)).abs() <= 1.1e-8 * (1 + 1e-7 * x.abs()))
    assert torch.isnan(quack_geglu.gelu(torch.tensor([float("nan")]))).all()


def test_coefficients_are_the_fit_scripts():
    assert gelu_fit.fit(len(quack_geglu.COEFFS)) == pytest.approx(quack_geglu.COEFFS, rel=1e-5, abs=1e-12)
    errors = gelu_fit.errors(quack_geglu.COEFFS)
    assert errors["max_abs_over_max_1_x"] < 1e-6 and errors["max_tail_beyond_fit_range"] < 1.1e-8


def test_interleave_puts_each_gate_row_before_its_up_row():
    w = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)  # [W_a (4 rows); W_g (4 rows)]
    b = torch.arange(8, dtype=torch.float32)
    wi, bi = quack_geglu.interleave(w, b)
    assert torch.equal(wi[0::2], w[4:]) and torch.equal(wi[1::2], w[:4])
    assert torch.equal(bi, torch.tensor([4.0, 0, 5, 1, 6, 2, 7, 3]))


def fake_gemm_gated(calls: list):
    """quack's gemm_gated as the op calls it: A (M, K), B (K, 2N) with gate/up columns interleaved."""

    def gemm_gated(A, B, bias, activation, store_preact, tuned):
        calls.append({"A": A, "B": B, "activation": activation, "store_preact": store_preact, "tuned": tuned})
        pre = A.float() @ B.float() + bias.float()
        return None, (pre[:, 1::2] * quack_geglu.gelu(pre[:, 0::2])).to(A.dtype)

    return gemm_gated


@pytest.fixture
def geglu_layer():
    torch.manual_seed(0)
    m = GEGLU(16, 24)
    quack_geglu.prepare(m, on=True)
    return m


def test_op_hands_quack_views_and_keeps_the_inputs_memory_order(monkeypatch, geglu_layer):
    calls = []
    monkeypatch.setattr(quack_geglu, "_gemm_gated", fake_gemm_gated(calls))
    m = geglu_layer
    x = torch.randn(2, 7, 5, 16).permute(0, 2, 1, 3)  # dense but permuted, as the temporal layers pass it
    out = quack_geglu.geglu(x, m.gated_weight, m.gated_bias)
    plain = m(x)  # not enabled: the plain path
    torch.testing.assert_close(out, plain, atol=2e-6, rtol=1e-5)
    assert out.shape == plain.shape and out.stride() == (5 * 7 * 24, 24, 5 * 24, 1)  # x's order, no copy
    (c,) = calls
    assert c["A"].shape == (70, 16) and c["B"].shape == (16, 48) and c["B"].stride() == (1, 16)
    assert c["B"].data_ptr() == m.gated_weight.data_ptr()  # the weight's transpose is a view
    assert c["store_preact"] is False and c["tuned"] is quack_geglu.TUNED


def test_gelu_layer_takes_the_op_when_it_applies_also_compiled(monkeypatch, geglu_layer):
    calls = []
    monkeypatch.setattr(quack_geglu, "_gemm_gated", fake_gemm_gated(calls))
    monkeypatch.setattr(quack_geglu, "applies", lambda x, w: w is not None)  # as on a GPU, once enabled
    m = geglu_layer
    x = torch.randn(3, 4, 16)
    ref = m.proj(x).chunk(2, dim=-1)
    ref = ref[0] * F.gelu(ref[1])
    torch.testing.assert_close(m(x), ref, atol=2e-6, rtol=1e-5)
    assert len(calls) == 1
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")  # the op's fake tensor function
    torch.testing.assert_close(compiled(x), ref, atol=2e-6, rtol=1e-5)
    assert len(calls) == 2
    quack_geglu.prepare(m, on=False)  # no interleaved copy: the plain path, no call
    torch.testing.assert_close(m(x), ref)
    assert len(calls) == 2


def test_op_falls_back_to_the_plain_path_once_quack_fails(monkeypatch, caplog, geglu_layer):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(quack_geglu, "_gemm_gated", failing)
    monkeypatch.setattr(quack_geglu, "_failed", set())
    m = geglu_layer
    x = torch.randn(6, 16)
    with caplog.at_level(logging.WARNING, logger="img2vid"):
        out = quack_geglu.geglu(x, m.gated_weight, m.gated_bias)
        again = quack_geglu.geglu(x, m.gated_weight, m.gated_bias)
    torch.testing.assert_close(out, m(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(again, out)
    assert len(calls) == 1  # the failed shape is not tried again
    assert "no kernel for this shape" in caplog.text and "plain path" in caplog.text


def test_prepare_adds_no_state_dict_keys(geglu_layer):
    m = geglu_layer
    assert m.gated_weight.shape == (48, 16) and m.gated_bias.shape == (48,)
    assert set(m.state_dict()) == {"proj.weight", "proj.bias"}
    quack_geglu.prepare(m, on=False)
    assert m.gated_weight is None and m.gated_bias is None


def test_reasons_it_is_off(monkeypatch):
    cpu = torch.device("cpu")
    assert quack_geglu.unavailable_reason(cpu, torch.float16) == "needs a CUDA device"
    assert quack_geglu.enable(cpu, torch.float16) == "off: needs a CUDA device"
    monkeypatch.setenv(quack_geglu.SWITCH, "0")
    assert quack_geglu.unavailable_reason(cpu, torch.float16) == f"{quack_geglu.SWITCH}=0"
    assert not quack_geglu.applies(torch.zeros(2, 16), torch.zeros(48, 16))


def test_cpu_pipeline_keeps_no_interleaved_copies():
    import img2vid

    pipe = img2vid.load("tiny", device="cpu")
    assert pipe.gated_gemm == "off"
    layers = [m for m in pipe.unet.modules() if isinstance(m, GEGLU)]
    assert layers and all(m.gated_weight is None for m in layers)


def test_enable_keeps_quacks_caches_in_img2vids_folder(monkeypatch, tmp_path):
    """Also when quack was imported before (FlashAttention-4 imports it) and so read no QUACK_CACHE_DIR."""
    import types

    quack = types.ModuleType("quack")
    cache = types.ModuleType("quack.cache")
    cache.CACHE_DIR = None  # as quack.cache sets it at import without the variable
    interface = types.ModuleType("quack.gemm_interface")
    interface.gemm_gated = object()
    quack.cache, quack.gemm_interface = cache, interface
    for name, module in (("quack", quack), ("quack.cache", cache), ("quack.gemm_interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("QUACK_CACHE_DIR", raising=False)
    monkeypatch.setattr(quack_geglu, "unavailable_reason", lambda device, dtype: None)
    monkeypatch.setattr(quack_geglu, "register", lambda: "img2vid_geglu_erf_test")
    for name in ("_enabled", "_gemm_gated", "_activation"):
        monkeypatch.setattr(quack_geglu, name, getattr(quack_geglu, name))
    assert quack_geglu.enable(torch.device("cuda"), torch.float16) == "on"
    expected = str(tmp_path / "img2vid" / "quack")
    assert (cache.CACHE_DIR, os.environ["QUACK_CACHE_DIR"]) == (expected, expected)
    assert quack_geglu._gemm_gated is interface.gemm_gated

"""The fused GEGLU kernel's Python side (img2vid/gate_gemm.py) on the CPU: the op's layouts with the CUDA kernel
replaced by its reference formula, when the kernel is used and when not, the toolchain checks, and (where nvcc
and CUTLASS's headers are installed) that gate_gemm.cu builds. The kernel's numbers are checked on the GPU by
benchmarks/cutlass_geglu.py and bench.py."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from img2vid import gate_gemm
from img2vid.models.layers import GEGLU


def _reference_gate_gemm(x, w, b, a):  # what the CUDA kernel computes: a * gelu(x w^T + b)
    assert x.is_contiguous() and a.is_contiguous() and x.dim() == 2
    return a * F.gelu(F.linear(x, w, b))


def _geglu(x, w, b):
    a, g = F.linear(x, w, b).chunk(2, dim=-1)
    return a * F.gelu(g)


def _fake_output(x, w, b):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        return torch.ops.img2vid.geglu_gate_gemm(
            mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b)
        )


INPUTS = {
    "2-D": lambda: torch.randn(30, 16),
    "3-D": lambda: torch.randn(2, 15, 16),
    "temporal view": lambda: torch.randn(2, 5, 6, 16).transpose(1, 2),  # (B, S, T, C) view of (B, T, S, C)
    "not dense": lambda: torch.randn(2, 12, 16)[:, ::2],
}


@pytest.mark.parametrize("kind", INPUTS)
def test_op_values_and_layout(kind, monkeypatch):
    monkeypatch.setattr(gate_gemm, "gate_gemm", _reference_gate_gemm)
    torch.manual_seed(0)
    x, w, b = INPUTS[kind](), torch.randn(64, 16), torch.randn(64)
    out = torch.ops.img2vid.geglu_gate_gemm(x, w, b)
    torch.testing.assert_close(out, _geglu(x, w, b), rtol=1e-5, atol=1e-5)
    fake = _fake_output(x, w, b)
    assert fake.shape == out.shape and fake.stride() == out.stride()  # what torch.compile plans with
    if kind == "temporal view":  # kept in the input's memory order: no copy of the input was needed
        assert out.stride()[1] < out.stride()[2]


def test_op_under_torch_compile(monkeypatch):
    monkeypatch.setattr(gate_gemm, "gate_gemm", _reference_gate_gemm)
    torch.manual_seed(1)
    x, w, b = INPUTS["temporal view"](), torch.randn(64, 16), torch.randn(64)

    def f(x):
        return torch.ops.img2vid.geglu_gate_gemm(F.layer_norm(x, (16,)), w, b) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), _geglu(F.layer_norm(x, (16,)), w, b) + 1, rtol=1e-5, atol=1e-5)


def test_geglu_takes_the_kernel_only_when_it_applies(monkeypatch):
    calls = []
    monkeypatch.setattr(gate_gemm, "geglu", lambda x, w, b: calls.append(x) or _geglu(x, w, b))
    layer = GEGLU(16, 32)
    x = torch.randn(3, 16)
    monkeypatch.setattr(gate_gemm, "_enabled", True)
    layer(x)  # enabled, but a CPU float32 input: the plain path
    assert calls == [] and not gate_gemm.applies(x, layer.proj.weight)
    monkeypatch.setattr(gate_gemm, "applies", lambda x, w: True)
    torch.testing.assert_close(layer(x), _geglu(x, layer.proj.weight, layer.proj.bias))
    assert len(calls) == 1


def test_enable_on_cpu_and_the_switch(monkeypatch):
    assert gate_gemm.enable(torch.device("cpu"), torch.float32) == "off: needs a CUDA device"
    monkeypatch.setattr(gate_gemm, "_enabled", True)
    monkeypatch.setenv(gate_gemm.SWITCH, "0")
    assert gate_gemm.enable(torch.device("cpu"), torch.float16) == "off: IMG2VID_GATE_GEMM=0"
    assert gate_gemm._enabled is False  # the switch turns an earlier enable off


def test_unavailable_reasons(monkeypatch, tmp_path):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert "Hopper" in gate_gemm.unavailable_reason(cuda, torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert gate_gemm.unavailable_reason(cuda, torch.bfloat16) == "needs float16"
    monkeypatch.setattr(gate_gemm, "built_library", lambda: None)
    monkeypatch.setattr(gate_gemm, "find_nvcc", lambda: None)
    assert gate_gemm.unavailable_reason(cuda, torch.float16) == gate_gemm.NO_NVCC
    monkeypatch.setattr(gate_gemm, "find_nvcc", lambda: "/usr/bin/nvcc")
    monkeypatch.setattr(gate_gemm, "find_cutlass", lambda: None)
    assert gate_gemm.unavailable_reason(cuda, torch.float16) == gate_gemm.NO_CUTLASS
    assert gate_gemm.status(cuda, torch.float16) == f"off: {gate_gemm.NO_CUTLASS}"
    monkeypatch.setattr(gate_gemm, "built_library", lambda: tmp_path / "gate_gemm.so")  # built before: enough
    assert gate_gemm.unavailable_reason(cuda, torch.float16) is None
    assert gate_gemm.status(cuda, torch.float16) == "on (built)"


def test_find_cutlass_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CUTLASS_DIR", str(tmp_path))
    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    assert gate_gemm.find_cutlass() != tmp_path  # no cutlass.h there: not taken
    (tmp_path / "include" / "cutlass" / "cutlass.h").write_text("")
    assert gate_gemm.find_cutlass() == tmp_path


needs_toolchain = pytest.mark.skipif(
    gate_gemm.find_nvcc() is None or gate_gemm.find_cutlass() is None,
    reason="needs nvcc and CUTLASS's headers (pip install --no-deps nvidia-cutlass)",
)


@pytest.mark.skipif(gate_gemm.find_nvcc() is None, reason="needs nvcc")
def test_build_reports_what_nvcc_said(monkeypatch, tmp_path):
    broken = tmp_path / "gate_gemm.cu"
    broken.write_text("this is not C++\n")
    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    (tmp_path / "include" / "cutlass" / "cutlass.h").write_text("")
    monkeypatch.setenv("CUTLASS_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(gate_gemm, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="nvcc failed to build gate_gemm.cu"):
        gate_gemm.build()
    assert not list((tmp_path / "cache").rglob("*.so"))


@needs_toolchain
def test_kernel_builds(monkeypatch, tmp_path):
    """The shipped source compiles for sm_90a with the toolchain found, and the library exports its entry points
    (about a minute and a half on two cores)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = gate_gemm.build()
    assert path.is_file() and path.parent == tmp_path / "img2vid" / "kernels"
    assert gate_gemm.built_library() == path and gate_gemm.build() == path  # built once, then found
    lib = ctypes.CDLL(str(path))
    assert lib.img2vid_cutlass_configs() == 4
    assert hasattr(lib, "img2vid_geglu_gate_gemm")
    monkeypatch.setattr(gate_gemm, "find_nvcc", lambda: None)  # a machine without nvcc finds it too
    assert gate_gemm.built_library() == path

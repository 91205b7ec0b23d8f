"""The spatial self-attention through FlashAttention-4 (img2vid/flash_attention.py), on the CPU.

The package's kernels need a Hopper or Blackwell GPU (benchmarks/fa4_attention.py measures them there). Here a
stand-in with its interface, (B, N, heads, d) tensors in and (out, lse) back, checks what img2vid hands it and
what it does with the result, eagerly and under torch.compile, and when img2vid uses it at all.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from img2vid import flash_attention
from img2vid.models.layers import Attention


def fa4_stand_in(calls: list):
    """flash_attn_func's interface, computed with scaled_dot_product_attention; records the inputs' layouts."""

    def flash_attn_func(q, k, v):
        calls.append([(t.shape, t.stride(), t.data_ptr()) for t in (q, k, v)])
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        return out.contiguous(), None  # (B, N, heads, d), as the package returns it

    return flash_attn_func


@torch.no_grad()
def test_self_attention_through_the_op_matches_the_plain_path(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(64, heads=4).eval()
    x = torch.randn(3, 20, 64)
    expect = attn(x)  # flash_attention not enabled: PyTorch's attention
    calls: list = []
    monkeypatch.setattr(flash_attention, "_attention", fa4_stand_in(calls))
    monkeypatch.setattr(flash_attention, "applies", lambda x, heads: True)
    got = attn(x)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    # q, k and v are handed over as (B, N, heads, d) views of the one fused projection, with no copies
    ((q, k, v),) = calls
    assert q[0] == k[0] == v[0] == (3, 20, 4, 16)
    assert q[1] == k[1] == v[1] == (20 * 192, 192, 16, 1)
    assert k[2] - q[2] == v[2] - k[2] == 64 * x.element_size()


@torch.no_grad()
def test_the_op_compiles_whole(monkeypatch):
    """Under torch.compile the op is one node whose fake implementation gives the output's shape."""
    torch.manual_seed(0)
    attn = Attention(32, heads=2).eval()
    x = torch.randn(2, 9, 32)
    expect = attn(x)
    calls: list = []
    monkeypatch.setattr(flash_attention, "_attention", fa4_stand_in(calls))
    monkeypatch.setattr(flash_attention, "applies", lambda x, heads: True)
    torch._dynamo.reset()
    got = torch.compile(attn, backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


def test_unavailable_reasons(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(flash_attention.SWITCH, "0")
    assert flash_attention.unavailable_reason(cpu, torch.float16) == "IMG2VID_FLASH_ATTENTION=0"
    assert flash_attention.enable(cpu, torch.float16) == "off: IMG2VID_FLASH_ATTENTION=0"
    monkeypatch.delenv(flash_attention.SWITCH)
    assert flash_attention.enable(cpu, torch.float16) == "off: needs a CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    cuda = torch.device("cuda")
    assert flash_attention.unavailable_reason(cuda, torch.float16).startswith("needs compute capability 9.x")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert flash_attention.unavailable_reason(cuda, torch.bfloat16) == "needs float16"
    monkeypatch.setattr(flash_attention, "installed", lambda: False)
    assert (
        flash_attention.unavailable_reason(cuda, torch.float16) == "not installed (pip install flash-attn-4)"
    )
    monkeypatch.setattr(flash_attention, "installed", lambda: True)
    assert flash_attention.unavailable_reason(cuda, torch.float16) is None


def test_a_failing_import_leaves_pytorchs_attention(monkeypatch, caplog):
    broken = types.ModuleType("flash_attn.cute")

    def fail(name):
        raise OSError("libcute_dsl_runtime.so: cannot open shared object file")

    broken.__getattr__ = fail  # `from flash_attn.cute import flash_attn_func` raises
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", broken)
    monkeypatch.setattr(flash_attention, "unavailable_reason", lambda device, dtype: None)
    monkeypatch.setattr(flash_attention, "_enabled", False)
    status = flash_attention.enable(torch.device("cuda"), torch.float16)
    assert status.startswith("off: import failed: OSError: libcute_dsl_runtime.so")
    assert not flash_attention._enabled
    assert "FlashAttention-4 not used" in caplog.text


def test_installed_is_false_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn fails
    assert not flash_attention.installed()


@pytest.mark.parametrize(
    "shape, heads, dtype, cuda, expect",
    [
        ((2, 9216, 320), 5, torch.float16, True, True),  # SVD-XT's first level: heads of 64
        ((2, 576, 1280), 20, torch.float16, True, True),
        ((2, 576, 1280), 10, torch.float16, True, True),  # heads of 128
        ((2, 144, 1280), 20, torch.float16, True, False),  # the middle block: PyTorch's kernel was as fast
        ((2, 9216, 320), 5, torch.bfloat16, True, False),  # not measured
        ((2, 9216, 320), 5, torch.float32, True, False),
        ((2, 9216, 320), 5, torch.float16, False, False),  # on the CPU
        ((2, 9216, 320), 4, torch.float16, True, False),  # heads of 80
        ((1, 4096, 512), 1, torch.float16, True, False),  # the VAE's one head of 512
    ],
)
def test_applies(monkeypatch, shape, heads, dtype, cuda, expect):
    monkeypatch.setattr(flash_attention, "_enabled", True)
    if cuda:
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert flash_attention.applies(torch.empty(shape, dtype=dtype), heads) is expect
    monkeypatch.setattr(flash_attention, "_enabled", False)
    assert not flash_attention.applies(torch.empty(shape, dtype=dtype), heads)

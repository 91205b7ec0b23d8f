"""The temporal layers in frame order (no transposes) and the Triton kernel of their attention, on the CPU.

The kernel runs in Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU), in a process of its own because
the interpreter is chosen when the kernel is defined; those tests are skipped where Triton is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from img2vid import frame_attention
from img2vid.models.unet import TemporalTransformerBlock

SRC = Path(__file__).resolve().parents[1] / "src"


def attention_over_frames(qkv: torch.Tensor, heads: int, frames: int) -> torch.Tensor:
    """What the kernel computes, in plain PyTorch: (B*T, S, 3C) frame-ordered [q, k, v] -> (B*T, S, C)."""
    BT, S, C3 = qkv.shape
    B, C, d = BT // frames, C3 // 3, C3 // 3 // heads
    q, k, v = (
        qkv.view(B, frames, S, 3, heads, d).permute(3, 0, 2, 4, 1, 5).reshape(3, B * S, heads, frames, d)
    )
    out = F.scaled_dot_product_attention(q, k, v).view(B, S, heads, frames, d)
    return out.permute(0, 3, 1, 2, 4).reshape(BT, S, C)


def random_block(dim: int = 32, heads: int = 2, context_dim: int = 24) -> TemporalTransformerBlock:
    block = TemporalTransformerBlock(dim, heads, context_dim).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)  # non-trivial norms and biases too
    return block


@pytest.mark.parametrize("context_tokens", [1, 3])
@torch.no_grad()
def test_temporal_block_in_frame_order_matches_sequences(monkeypatch, context_tokens):
    """The frame-order path (taken with the kernel; here the kernel's formula stands in for it) gives what the
    reference's transposed sequences give, for SVD's one context token and for several."""
    torch.manual_seed(0)
    block = random_block()
    B, T, S = 2, 5, 6
    x = torch.randn(B * T, S, 32)
    context = torch.randn(B, context_tokens, 24)
    expect = block(x, context, T)  # on the CPU the kernel does not apply: sequences
    calls = []

    def stand_in(qkv, heads, frames):
        calls.append(qkv.shape)
        return attention_over_frames(qkv, heads, frames)

    monkeypatch.setattr(frame_attention, "applies", lambda x, heads, frames: True)
    monkeypatch.setattr(frame_attention, "frame_attention", stand_in)
    got = block(x, context, T)
    assert calls == [(B * T, S, 3 * 32)]
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    # and the frames of a video do mix: changing one frame changes the others' outputs
    x2 = x.clone()
    x2[0] += torch.randn_like(x2[0])  # (a constant shift would vanish in the layer norms)
    assert not torch.allclose(block(x2, context, T)[1], got[1])


def test_unavailable_reasons(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(frame_attention.SWITCH, "0")
    assert frame_attention.unavailable_reason(cpu, torch.float16) == "IMG2VID_FRAME_ATTENTION=0"
    assert frame_attention.enable(cpu, torch.float16) == "off: IMG2VID_FRAME_ATTENTION=0"
    monkeypatch.delenv(frame_attention.SWITCH)
    monkeypatch.setattr(frame_attention, "have_triton", lambda: False)
    assert frame_attention.unavailable_reason(cpu, torch.float16) == "needs Triton"
    monkeypatch.setattr(frame_attention, "have_triton", lambda: True)
    assert frame_attention.unavailable_reason(cpu, torch.float16) == "needs a CUDA device"
    assert frame_attention.enable(cpu, torch.float16) == "off: needs a CUDA device"


def test_a_failing_triton_leaves_the_plain_path(monkeypatch, caplog):
    def broken():
        raise ImportError("libtriton.so: cannot open shared object file")

    monkeypatch.setattr(frame_attention, "unavailable_reason", lambda device, dtype: None)
    monkeypatch.setattr(frame_attention, "build", broken)
    monkeypatch.setattr(frame_attention, "_enabled", False)
    status = frame_attention.enable(torch.device("cuda"), torch.float16)
    assert status.startswith("off: Triton failed: ImportError: libtriton.so")
    assert not frame_attention._enabled
    assert "temporal attention kernel not used" in caplog.text


def test_applies_only_to_what_the_kernel_handles(monkeypatch):
    x = torch.empty(10, 6, 128, dtype=torch.float16)  # 2 heads of 64
    monkeypatch.setattr(frame_attention, "_enabled", True)
    assert not frame_attention.applies(x, 2, 5)  # on the CPU: the plain path
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert frame_attention.applies(x, 2, 5)
    assert not frame_attention.applies(x.bfloat16(), 2, 5)  # measured and tested in fp16 only
    assert frame_attention.applies(x, 8, 5)  # heads of 16
    assert not frame_attention.applies(x.float(), 2, 5)
    assert not frame_attention.applies(x, 2, frame_attention.MAX_FRAMES + 1)
    assert not frame_attention.applies(x, 3, 5)  # heads of 42 channels and a bit
    assert not frame_attention.applies(x, 16, 5)  # heads of 8
    monkeypatch.setattr(frame_attention, "_enabled", False)
    assert not frame_attention.applies(x, 2, 5)


KERNEL_CHECK = textwrap.dedent(
    """
    import torch
    from img2vid import frame_attention as fa
    from test_frame_attention import attention_over_frames, random_block

    torch.manual_seed(0)
    worst = 0.0
    for B, T, S, heads, d in [(2, 25, 5, 2, 64), (1, 14, 3, 1, 16), (2, 3, 4, 4, 32), (1, 33, 2, 1, 128)]:
        C = heads * d
        big = torch.randn(B * T, S, 4 * C).half()
        for qkv in (big[..., : 3 * C].contiguous(), big[..., C:]):  # dense, and rows 4C apart
            out = fa.frame_attention(qkv, heads, T)
            ref = attention_over_frames(qkv.float(), heads, T)
            assert out.shape == ref.shape and out.dtype == torch.float16 and out.is_contiguous()
            worst = max(worst, ((out.float() - ref).abs().max() / ref.abs().max()).item())
    # a whole temporal block in fp16, through the kernel, against the transposed sequences in fp32
    block = random_block(dim=64, heads=2)
    x, context = torch.randn(2 * 5, 3, 64), torch.randn(2, 1, 24)
    with torch.no_grad():
        expect = block(x, context, 5)
        fa.applies = lambda x, heads, frames: True
        got = block.half()(x.half(), context.half(), 5).float()
    block_err = ((got - expect).abs().max() / expect.abs().max()).item()
    print(worst, block_err)
    """
)


def test_kernel_matches_attention_in_the_triton_interpreter():
    pytest.importorskip("triton")
    path = os.pathsep.join(filter(None, [str(SRC), str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    run = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    worst, block_err = map(float, run.stdout.split()[-2:])
    assert worst < 2e-3  # fp16 output and probabilities: about one rounding of half precision
    assert block_err < 2e-2  # a whole block in fp16 (norms, feed-forwards, residuals) against fp32

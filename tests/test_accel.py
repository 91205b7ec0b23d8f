"""The fast paths (img2vid.accel), on the CPU: choosing them, the module swaps each makes and that a swapped
network computes what the plain one does, and the compiled path's artifacts (a real AOTInductor round trip on
a small network). The kernels themselves need a Hopper GPU: benchmarks/bench.py measures them there; here
stand-ins with their interfaces check what img2vid hands them."""

from __future__ import annotations

import logging
import math
import sys
import types
import warnings
from pathlib import Path

import gelu_fit
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import img2vid
from img2vid import accel
from img2vid.accel import compiled, flash_attention, layout, quack_geglu
from img2vid.models.layers import GEGLU, Attention

# ---------------------------------------------------------------------------------------------------- choosing


def test_requested_names():
    assert accel.requested("auto") == accel.NAMES
    assert accel.requested("none") == ()
    assert accel.requested("compiled, channels_last") == ("channels_last", "compiled")  # applied in order
    assert accel.requested(["quack_geglu"]) == ("quack_geglu",)
    with pytest.raises(ValueError, match="unknown fast path.*warp_drive"):
        accel.requested("warp_drive")
    assert "compiled" not in accel.without_compiled("auto")
    assert accel.without_compiled("compiled") == "none"


def test_environment_sets_the_default(monkeypatch):
    monkeypatch.setenv(accel.SWITCH, "none")
    assert accel.requested(None) == ()
    pipe = img2vid.load("tiny", device="cpu")
    assert not any(pipe.accel.on(n) for n in accel.NAMES)


def test_nothing_is_swapped_on_the_cpu():
    """None of the paths runs on the CPU; the report says why, and the networks stay as built."""
    pipe = img2vid.load("tiny", device="cpu", accel="auto")
    assert set(pipe.accel.paths) == set(accel.NAMES)
    assert not any(pipe.accel.on(n) for n in accel.NAMES)
    assert all("CUDA" in state for state in pipe.accel.paths.values())
    kinds = {type(m) for net in (pipe.unet, pipe.vae) for m in net.modules()}
    assert not kinds & {
        layout.ChannelsLastGroupNorm,
        flash_attention.FlashSelfAttention,
        quack_geglu.QuackGEGLU,
    }
    assert pipe.unet_forward is pipe.unet and pipe.decoder_forward is pipe.vae.decoder


def test_a_path_that_fails_to_set_up_is_reported_and_skipped(monkeypatch, caplog):
    pipe = img2vid.load("tiny", device="cpu", accel="none")
    monkeypatch.setattr(layout, "unavailable", lambda device, dtype, memory: None)

    def broken(pipe, report):
        raise OSError("libcute_dsl_runtime.so: cannot open shared object file")

    monkeypatch.setattr(layout, "apply", broken)
    with caplog.at_level(logging.WARNING, logger="img2vid"):
        report = accel.apply(pipe, "channels_last")
    assert report.paths["channels_last"].startswith("off: failed to set up: OSError: libcute")
    assert "channels_last not used" in caplog.text


# ------------------------------------------------------------------------------------------------ channels_last


@torch.no_grad()
@pytest.mark.parametrize("shape", [(3, 64, 5, 7), (2, 96, 3, 5, 7)])
def test_channels_last_group_norm_is_group_norm(shape):
    """Per-channel statistics combined per group, against F.group_norm in float64, on data whose mean is far
    from zero (where a careless variance loses digits), and in half precision."""
    torch.manual_seed(0)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = (torch.randn(shape) * 3 + 20).contiguous(memory_format=fmt)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    ref = F.group_norm(x.double(), 32, w.double(), b.double(), 1e-5)
    out = layout.group_norm_channels_last(x, 32, w, b, 1e-5)
    assert out.dtype == x.dtype and out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    half = layout.group_norm_channels_last(x.half(), 32, w.half(), b.half(), 1e-5)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), ref, rtol=0, atol=1e-2)
    plain = F.group_norm(x.double(), 32, eps=1e-5)
    torch.testing.assert_close(
        layout.group_norm_channels_last(x, 32, None, None, 1e-5).double(), plain, atol=2e-5, rtol=0
    )


@torch.no_grad()
def test_group_norm_traces_to_the_channels_last_form_only_where_it_pays():
    """Traced (torch.export, as the compiled path does), the swapped norm takes the channels-last form for a
    channels-last input with few (sample, group) rows, PyTorch's group norm otherwise; eager mode always takes
    PyTorch's. The results agree."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.GroupNorm(32, 64))
    nn.init.uniform_(net[0].weight, 0.5, 1.5)
    nn.init.normal_(net[0].bias)
    assert layout.swap_group_norms(net) == 1 and type(net[0]) is layout.ChannelsLastGroupNorm
    few = torch.randn(2, 64, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)  # 64 rows
    many = torch.randn(20, 64, 4, 5).contiguous(memory_format=torch.channels_last)  # 640 rows
    uses = {}
    for name, x in {"few": few, "many": many, "nchw": few.contiguous()}.items():
        ep = torch.export.export(net, (x,), strict=False)
        uses[name] = any("var_mean" in str(n.target) for n in ep.graph.nodes)
        torch.testing.assert_close(
            ep.module()(x), F.group_norm(x, 32, net[0].weight, net[0].bias), rtol=1e-5, atol=1e-5
        )
    assert uses == {"few": True, "many": False, "nchw": False}


@torch.no_grad()
def test_channels_last_unet_exports_in_the_layout_it_runs_and_matches_eager():
    """The UNet as the GPU runs it (channels-last weights and input, swapped norms), exported as a build exports
    it: every norm sees the channels-last activation it gets at run time and takes the channels-last form, the
    temporal ones after 3-D convolutions too (torch.export's own tracing reports those convolutions' outputs as
    NCDHW, and PyTorch's group norm was traced there); the graph computes what eager mode does."""
    pipe = img2vid.load("tiny", device="cpu")
    layout.to_channels_last(pipe.unet)
    norms = layout.swap_group_norms(pipe.unet)
    x = torch.randn(6, 8, 32, 32).contiguous(memory_format=torch.channels_last)
    args = (torch.zeros(6), torch.randn(6, 1, 32), torch.randn(6, 3))
    eager = pipe.unet(x, *args, 3)
    weights = [t for _, t in compiled._state(pipe.unet)]
    with compiled._backends_on_while_tracing():
        ep = compiled._export(pipe.unet, weights, (x, *args), 3)
    targets = [str(n.target) for n in ep.graph.nodes]
    assert sum("var_mean" in t for t in targets) == norms  # one per channels-last norm
    assert not any("group_norm" in t for t in targets)
    torch.testing.assert_close(ep.module()(weights, x, *args), eager, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- flash_attention


def fa4_stand_in(calls: list):
    """flash_attn_func's interface, computed with scaled_dot_product_attention; records the inputs' layouts."""

    def flash_attn_func(q, k, v):
        calls.append([(t.shape, t.stride(), t.data_ptr()) for t in (q, k, v)])
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        return out.contiguous(), None  # (B, N, heads, d), as the package returns it

    return flash_attn_func


@torch.no_grad()
def test_flash_self_attention_hands_the_kernel_views_and_matches(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(256, heads=4).eval()
    x = torch.randn(3, 600, 256)
    expect = attn(x)
    calls: list = []
    monkeypatch.setattr(flash_attention, "_attention", fa4_stand_in(calls))
    attn.__class__ = flash_attention.FlashSelfAttention
    attn.half()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    torch.testing.assert_close(attn(x.half()).float(), expect, rtol=1e-2, atol=1e-2)
    # q, k and v are handed over as (B, N, heads, d) views of the one fused projection, with no copies
    ((q, k, v),) = calls
    assert q[0] == k[0] == v[0] == (3, 600, 4, 64)
    assert q[1] == k[1] == v[1] == (600 * 768, 768, 64, 1)
    assert k[2] - q[2] == v[2] - k[2] == 256 * 2
    attn(x.half()[:, :100])  # fewer than MIN_TOKENS: PyTorch's attention
    attn.float()(x)  # fp32: PyTorch's attention
    assert len(calls) == 1


def test_flash_attention_op_exports_whole(monkeypatch):
    """Exported, the kernel is one node whose fake implementation gives the output's shape."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 96)
    calls: list = []
    monkeypatch.setattr(flash_attention, "_attention", fa4_stand_in(calls))

    class Op(nn.Module):
        def forward(self, qkv):
            return flash_attention.flash_attention(qkv, 2)

    ep = torch.export.export(Op(), (qkv,), strict=False)
    assert any("img2vid.flash_attention" in str(n.target) for n in ep.graph.nodes)
    q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in qkv.chunk(3, -1))
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 9, 32)
    torch.testing.assert_close(ep.module()(qkv), ref, rtol=1e-5, atol=1e-5)


def test_dsl_paths_need_hopper_fp16_and_the_package(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert "compute capability" in flash_attention.unavailable(cuda, torch.float16, "fast")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "float16" in flash_attention.unavailable(cuda, torch.bfloat16, "fast")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    assert "not installed" in flash_attention.unavailable(cuda, torch.float16, "fast")
    assert "fast memory mode" in quack_geglu.unavailable(cuda, torch.float16, "low")


# -------------------------------------------------------------------------------------------------- quack_geglu


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
    tail = (x < -4) & (x > -5.5)  # torch's float32 GELU loses the tail to cancellation; the polynomial not
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
        calls.append({"A": A, "B": B, "store_preact": store_preact, "tuned": tuned})
        pre = A.float() @ B.float() + bias.float()
        return None, (pre[:, 1::2] * quack_geglu.gelu(pre[:, 0::2])).to(A.dtype)

    return gemm_gated


@torch.no_grad()
def test_quack_geglu_hands_quack_views_and_keeps_the_inputs_memory_order(monkeypatch):
    torch.manual_seed(0)
    m = GEGLU(16, 24)
    x = torch.randn(2, 7, 5, 16).permute(0, 2, 1, 3)  # dense but permuted, as the temporal layers pass it
    plain = m(x)
    quack_geglu.QuackGEGLU.from_module(m)
    assert set(m.state_dict()) == {"proj.weight", "proj.bias"}  # the interleaved copy is not saved
    calls = []
    monkeypatch.setattr(quack_geglu, "_gemm_gated", fake_gemm_gated(calls))
    out = quack_geglu.geglu(x, m.gated_weight, m.gated_bias)
    torch.testing.assert_close(out, plain, atol=2e-6, rtol=1e-5)
    assert out.shape == plain.shape and out.stride() == (5 * 7 * 24, 24, 5 * 24, 1)  # x's order, no copy
    (c,) = calls
    assert c["A"].shape == (70, 16) and c["B"].shape == (16, 48) and c["B"].stride() == (1, 16)
    assert c["B"].data_ptr() == m.gated_weight.data_ptr()  # the weight's transpose is a view
    assert c["store_preact"] is False and c["tuned"] is quack_geglu.TUNED
    assert torch.equal(m(x), plain)  # on the CPU the swapped layer takes the plain path


@torch.no_grad()
def test_quack_geglu_falls_back_to_the_plain_path_once_quack_fails(monkeypatch, caplog):
    torch.manual_seed(0)
    m = quack_geglu.QuackGEGLU.from_module(GEGLU(16, 24))
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(quack_geglu, "_gemm_gated", failing)
    monkeypatch.setattr(quack_geglu, "_failed", set())
    x = torch.randn(6, 16)
    with caplog.at_level(logging.WARNING, logger="img2vid"):
        out = quack_geglu.geglu(x, m.gated_weight, m.gated_bias)
        again = quack_geglu.geglu(x, m.gated_weight, m.gated_bias)
    torch.testing.assert_close(out, GEGLU.forward(m, x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(again, out)
    assert len(calls) == 1  # the failed shape is not tried again
    assert "no kernel for this shape" in caplog.text


def test_quack_setup_keeps_its_caches_in_img2vids_folder(monkeypatch, tmp_path):
    """Also when quack was imported before (FlashAttention-4 imports it) and so read no QUACK_CACHE_DIR."""
    quack = types.ModuleType("quack")
    cache = types.ModuleType("quack.cache")
    cache.CACHE_DIR = None  # as quack.cache sets it at import without the variable
    interface = types.ModuleType("quack.gemm_interface")
    interface.gemm_gated = object()
    quack.cache, quack.gemm_interface = cache, interface
    for name, module in (("quack", quack), ("quack.cache", cache), ("quack.gemm_interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("IMG2VID_CACHE", str(tmp_path))
    monkeypatch.delenv("QUACK_CACHE_DIR", raising=False)
    monkeypatch.setattr(quack_geglu, "register", lambda: "img2vid_geglu_erf_test")
    for name in ("_gemm_gated", "_activation"):
        monkeypatch.setattr(quack_geglu, name, getattr(quack_geglu, name))
    assert quack_geglu.setup() == str(tmp_path / "quack")
    assert str(tmp_path / "quack") == cache.CACHE_DIR and quack_geglu._gemm_gated is interface.gemm_gated


# ----------------------------------------------------------------------------------------------------- compiled


class Small(nn.Module):
    """A network with the UNet's calling convention: tensors, then num_frames."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.qkv = nn.ModuleList([nn.Linear(4, 4, bias=False) for _ in range(3)])

    def forward(self, x: torch.Tensor, scale: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.norm(self.conv(x)) * scale[:, None, None, None]
        w = torch.cat([m.weight for m in self.qkv])  # a function of the weights alone, as Attention.fused_qkv
        h = F.linear(h.movedim(1, -1), w)[..., :4].movedim(-1, 1)
        return (
            h.unflatten(0, (-1, num_frames))
            .mean(1, keepdim=True)
            .expand(-1, num_frames, -1, -1, -1)
            .flatten(0, 1)
        )


def test_compiled_net_runs_eagerly_until_built_then_loads_and_follows_moved_weights(tmp_path, monkeypatch):
    """A shape without an artifact runs eagerly and is remembered; once built, the artifact (no weights of its
    own) gives the eager result, also in a new CompiledNet (a later process), and again after the network's
    weights were replaced (low-memory mode moves them); another shape is another artifact."""
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    monkeypatch.setattr(
        compiled, "aot_probe", lambda device, progress=None: None
    )  # packages load here (tested below)
    torch.manual_seed(0)
    net = Small().eval().requires_grad_(False)
    x, s = torch.randn(4, 4, 6, 6), torch.rand(4)
    expect = net(x, s, 2)
    f = compiled.CompiledNet("small", net, {"test": 1}, tmp_path)
    torch.testing.assert_close(f(x, s, 2), expect)
    assert len(f.missing) == 1 and not f.loaded
    (key,) = f.missing
    assert f.build(key) and f.path(key).is_file() and not f.missing
    path = f.path(key)

    later = compiled.CompiledNet("small", net, {"test": 1}, tmp_path)
    torch.testing.assert_close(later(x, s, 2), expect, rtol=1e-5, atol=1e-5)
    assert later.loaded and not later.missing
    with torch.no_grad():  # new tensors, as memory.offload/onload make them
        for p in net.parameters():
            p.data = torch.randn_like(p)
    torch.testing.assert_close(later(x, s, 2), net(x, s, 2), rtol=1e-5, atol=1e-5)
    later(torch.randn(6, 4, 6, 6), torch.rand(6), 3)  # another shape: eagerly, remembered
    assert len(later.missing) == 1
    assert compiled.CompiledNet("small", net, {"test": 2}, tmp_path).path(key) != path  # the key counts


def test_a_build_shows_none_of_torchs_internal_notices(tmp_path, monkeypatch):
    """torch.export's deprecation notice about its own tree specs interrupts the CLI's progress lines."""
    monkeypatch.setattr(compiled, "aot_probe", lambda device, progress=None: None)
    net = Small().eval().requires_grad_(False)
    f = compiled.CompiledNet("small", net, {}, tmp_path)
    f(torch.randn(2, 4, 6, 6), torch.rand(2), 2)
    (key,) = f.missing
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        assert f.build(key)
    assert not [w for w in heard if "LeafSpec" in str(w.message) or "TensorFloat32" in str(w.message)]


def test_a_failed_build_is_remembered_and_runs_eagerly(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(compiled, "aot_probe", lambda device, progress=None: None)
    net = Small().eval().requires_grad_(False)
    x, s = torch.randn(2, 4, 6, 6), torch.rand(2)
    f = compiled.CompiledNet("small", net, {}, tmp_path)
    f(x, s, 2)
    (key,) = f.missing

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with caplog.at_level(logging.WARNING, logger="img2vid"):
        assert not f.build(key)
    assert "no C++ compiler" in f.failed_reason(key) and "compiling failed" in caplog.text
    monkeypatch.undo()
    assert not f.build(key)  # not tried again: that shape stays eager
    torch.testing.assert_close(f(x, s, 2), net(x, s, 2))


def test_where_packages_do_not_load_torch_compile_runs_in_the_process(tmp_path, monkeypatch):
    """The jit backend: build compiles with torch.compile (its eager backend here, for speed) and later calls of
    that shape take it; nothing is written for other processes."""
    monkeypatch.setattr(
        compiled, "aot_probe", lambda device, progress=None: "loading a package failed (signal 11)"
    )
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net, **kw: real(net, backend="eager", **kw))
    net = Small().eval().requires_grad_(False)
    x, s = torch.randn(4, 4, 6, 6), torch.rand(4)
    f = compiled.CompiledNet("small", net, {}, tmp_path)
    f(x, s, 2)
    (key,) = f.missing
    assert f.backend() == "jit" and f.build(key) and not f.missing and key in f.loaded
    calls = []
    run = f.loaded[key]
    f.loaded[key] = lambda *t: calls.append(1) or run(*t)
    torch.testing.assert_close(f(x, s, 2), net(x, s, 2))
    assert calls == [1] and not list(tmp_path.glob("*.pt2"))


@pytest.mark.parametrize(
    "script, expect",
    [
        ("import sys", None),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "signal 11"),
        ("raise SystemExit('no kernel image')", "exit 1: no kernel image"),
    ],
)
def test_the_package_probe_runs_apart_and_is_remembered(tmp_path, monkeypatch, script, expect):
    """Loading a package runs in a separate process (a crash there is an answer, not the end of this one), and
    the answer is kept: the second question builds nothing."""
    monkeypatch.setenv("IMG2VID_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled, "_compilers", lambda: [None])
    builds = []

    def fake_build(ep, package_path):
        builds.append(package_path)
        open(package_path, "wb").close()
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_build)
    monkeypatch.setattr(compiled, "_PROBE", script)
    cpu = torch.device("cpu")
    heard: list[str] = []
    first = compiled.aot_probe(cpu, heard.append)
    assert (first is None) if expect is None else (expect in first)
    assert compiled.aot_probe(cpu, heard.append) == first and len(builds) == 1
    assert len(heard) == 1 and "checking" in heard[0]  # said when the check runs, not when it is known


def test_the_probe_tries_the_next_compiler_and_builds_with_the_one_that_works(tmp_path, monkeypatch):
    """A package that crashes on load (built by a compiler with another C++ runtime) sends the probe on to the
    next compiler on PATH; later builds use the one whose package loaded."""
    monkeypatch.setenv("IMG2VID_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled, "_compilers", lambda: [None, "/opt/good/g++"])
    used = []

    def fake_build(ep, package_path):  # the package remembers which compiler Inductor was told to use
        cxx = torch._inductor.config.cpp.cxx[-1]
        used.append(cxx)
        Path(package_path).write_text(str(cxx))
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_build)
    load = "import os, signal, sys\nif open(sys.argv[1]).read() != '/opt/good/g++': os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(compiled, "_PROBE", load)
    cpu = torch.device("cpu")
    assert compiled.aot_compiler(cpu) is None  # not probed yet
    assert compiled.aot_probe(cpu) is None
    assert used[-1] == "/opt/good/g++" and len(used) == 2 and used[0] != "/opt/good/g++"
    assert compiled.aot_compiler(cpu) == "/opt/good/g++"
    with compiled._compiler(compiled.aot_compiler(cpu)):
        assert torch._inductor.config.cpp.cxx == ("/opt/good/g++",)

    monkeypatch.setattr(compiled, "_PROBE", "raise SystemExit('no')")
    monkeypatch.setenv("CXX", "/opt/other/g++")  # another $CXX is asked anew, and no compiler works
    reason = compiled.aot_probe(cpu)
    assert reason.count("exit 1") == 2 and "built by /opt/good/g++" in reason
    assert compiled.aot_compiler(cpu) is None


def test_deciding_whether_artifacts_can_load_does_not_import_inductor():
    """Importing Inductor takes seconds; a command that only loads artifacts must not pay for it."""
    import subprocess

    code = (
        "import sys, torch; from img2vid.accel import compiled; "
        "print(compiled.unavailable(torch.device('cuda'), torch.float16, 'fast'), 'torch._inductor' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "False"]

"""Where one full-size SVD-XT UNet step spends its time, under several execution choices (GPU).

    python benchmarks/profile_unet.py --variants eager,compile,compile_cl_cg --profile --out $OUT

Random weights at full size: timing does not depend on the values. Prints seconds per UNet call (CFG batch
2 x 25 frames, 576x1024) and, with --profile, the top CUDA kernels of each compiled variant (kernels_*.json).
A variant is "eager", "channels_last" or "compile" followed by options joined with "_": cl (channels-last
weights and input, as the pipeline runs half precision), cg (CUDA graphs, mode="reduce-overhead", for each region with regions), geglu (the
geglu_triton.py experiment), tma (its persistent TMA kernel), cutlass (GEGLU's gate in a CUTLASS GEMM
epilogue, img2vid/gate_gemm.py, which the pipeline uses on Hopper; every other variant runs without it), frames
(the temporal layers' attention kernel, img2vid/frame_attention.py, which the pipeline uses on CUDA; without
it the temporal layers take the plain path), seqs (the temporal layers on transposed (B*S, T, C) sequences, as
before that kernel), pr (img2vid.runtime.use_inductor_heuristics, which the pipeline installs: persistent
reductions for rows of up to 1024 elements whose reduction hint is DEFAULT, e.g. layer norms fused with
broadcast adds; without it Inductor's own heuristics; run with TORCHINDUCTOR_FX_GRAPH_CACHE=0, since torch
2.11's compiled-graph cache does not key on them), pr2k (with pr: up to 2048 elements, the 1280-channel layer
norms too), fa4 (FlashAttention-4 for the spatial self-attention, img2vid/flash_attention.py, which the
pipeline uses where the package is installed), max
(Inductor's GEMM autotuning), cd (coordinate-descent tuning), regions (compile block by block, as the pipeline does by default, instead of one
graph), qkv3 (self-attention with three q/k/v products instead of one, as before they were fused), stockgn
(PyTorch's own group norm instead of img2vid's channels-last formulation), plaincat (torch.cat for the
skip connections instead of layers.cat_channels), halves (the two guidance halves one after the other, batch
T each, as low mode runs them), streams (the two halves at once on two CUDA streams), mk
(Inductor's multi-kernel: each reduction compiled both persistent and looped, the faster one kept; it
crashed on a compile-cache hit in the pipeline, RESULTS.md runs 32-33), and the Inductor flags of
INDUCTOR_OPTIONS: nd (2-D tiles for transposed reads), af (aggressive fusion), mp (tuning each pointwise
kernel's tile size); none was faster (RESULTS.md, run 35).
Run each compiled variant in a process of its own, with its own TORCHINDUCTOR_CACHE_DIR, for cold compile times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import img2vid.models.unet as unet_module  # noqa: E402
from img2vid import (  # noqa: E402
    flash_attention,
    frame_attention,
    gate_gemm,
    runtime,  # noqa: E402
)
from img2vid.config import PRESETS  # noqa: E402
from img2vid.models import UNet, init_random  # noqa: E402
from img2vid.models.layers import GEGLU, Attention, GroupNorm, attention, cross_attend  # noqa: E402
from img2vid.runtime import compile_network, uncompile_network, use_channels_last  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import geglu_triton  # noqa: E402

_GEGLU_FORWARD = GEGLU.forward


def _fused_geglu_forward(self, x):  # the experiment of geglu_triton.py (option "geglu")
    return geglu_triton.geglu_linear(x, self.proj.weight, self.proj.bias)


def _tma_geglu_forward(self, x):  # its persistent TMA version (option "tma")
    return geglu_triton.geglu_linear_tma_or_reference(x, self.proj.weight, self.proj.bias)


_ATTENTION_FORWARD = Attention.forward
_GROUPNORM_FORWARD = GroupNorm.forward
_CAT_CHANNELS = unet_module.cat_channels


def _plain_cat(tensors):  # option "plaincat"
    return torch.cat(tensors, dim=1)


def _qkv3_attention_forward(self, x, context=None):  # option "qkv3": separate q/k/v products
    if context is not None and context.shape[1] == 1:
        return self.to_out(self.to_v(context))
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    B, N, C = q.shape
    q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
    return self.to_out(attention(q, k, v).transpose(1, 2).reshape(B, N, C))


_TEMPORAL_FORWARD = unet_module.TemporalTransformerBlock.forward


def _sequences_temporal_forward(self, x, context, num_frames):  # option "seqs": the layout before run 45
    """The temporal block as the reference runs it: tokens transposed to (B*S, T, C) sequences and back."""
    BT, S, C = x.shape
    x = x.unflatten(0, (-1, num_frames)).transpose(1, 2).reshape(-1, num_frames, C)
    x = self.ff_in(self.norm_in(x)) + x
    x = self.attn1(self.norm1(x)) + x
    a = cross_attend(self.attn2, self.norm2, x, context)
    x = (x.unflatten(0, (a.shape[0], -1)) + a[:, None]).flatten(0, 1)
    x = self.ff(self.norm3(x)) + x
    return x.unflatten(0, (-1, S)).transpose(1, 2).reshape(BT, S, C)


# Options that set Inductor configuration flags# Options that set Inductor configuration flags (run 35): name -> {config path: value}.
INDUCTOR_OPTIONS = {
    "nd": {"triton.prefer_nd_tiling": True, "triton.tile_reductions": True},  # 2-D tiles for transposes
    "af": {"aggressive_fusion": True},  # fuse nodes even without shared reads
    "mp": {"max_autotune_pointwise": True},  # time several tile sizes of each pointwise/reduction kernel
}


def _set_inductor_options(opts: list[str], defaults: dict) -> None:
    """Put every INDUCTOR_OPTIONS flag back to its default, then set those of the options named in opts."""
    for name, flags in INDUCTOR_OPTIONS.items():
        for path, value in flags.items():
            *owners, attr = path.split(".")
            obj = torch._inductor.config
            for part in owners:
                obj = getattr(obj, part)
            defaults.setdefault(path, getattr(obj, attr))
            setattr(obj, attr, value if name in opts else defaults[path])


def bench(fn, n=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="eager,channels_last,compile")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    cfg = PRESETS["svd-xt"].unet
    with torch.device("meta"):
        unet = UNet(cfg)
    unet.to_empty(device=dev)
    init_random(unet)
    unet.to(dt).eval().requires_grad_(False)
    T = a.frames
    B = 2 * T
    x = torch.randn(B, 8, 72, 128, device=dev, dtype=dt)
    c_noise = torch.full((B,), 0.25 * 3.0, device=dev)
    ctx = torch.randn(B, 1, 1024, device=dev, dtype=dt)
    vec = torch.tensor([[6.0, 127.0, 0.02]], device=dev).expand(B, 3)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": a.dtype}

    streams = torch.cuda.Stream(), torch.cuda.Stream()

    def call(m, inp, split=None):
        """split None: one call on the whole CFG batch; "halves": the two guidance halves one after the other;
        "streams": the two halves on two CUDA streams at once."""
        torch.compiler.cudagraph_mark_step_begin()
        if split is None:
            with torch.no_grad():
                return m(inp, c_noise, ctx, vec, T)
        cur, outs = torch.cuda.current_stream(), []
        for i, half in enumerate((slice(0, B // 2), slice(B // 2, B))):
            s = streams[i] if split == "streams" else cur
            s.wait_stream(cur)
            with torch.cuda.stream(s), torch.no_grad():
                outs.append(m(inp[half], c_noise[half], ctx[half], vec[half], T))
        for s in streams:
            cur.wait_stream(s)
        return torch.cat(outs)

    ref = None
    inductor_defaults: dict = {}
    for v in a.variants.split(","):
        opts = v.split("_")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        inp = x
        m = unet
        split = "streams" if "streams" in opts else "halves" if "halves" in opts else None
        GEGLU.forward = _GEGLU_FORWARD
        Attention.forward = _qkv3_attention_forward if "qkv3" in opts else _ATTENTION_FORWARD
        GroupNorm.forward = torch.nn.GroupNorm.forward if "stockgn" in opts else _GROUPNORM_FORWARD
        unet_module.cat_channels = _plain_cat if "plaincat" in opts else _CAT_CHANNELS
        if "geglu" in opts:
            GEGLU.forward = _fused_geglu_forward
        if "tma" in opts:
            GEGLU.forward = _tma_geglu_forward
        # GEGLU's gate in a CUTLASS GEMM epilogue (img2vid.gate_gemm, as the pipeline uses it on Hopper) only
        # with option "cutlass", so that the other variants time the plain path.
        os.environ[gate_gemm.SWITCH] = "1" if "cutlass" in opts else "0"
        print("fused GEGLU kernel:", gate_gemm.enable(dev, dt), flush=True)
        # Likewise the temporal attention kernel (img2vid.frame_attention) only with option "frames"; option
        # "seqs" runs the temporal layers on transposed (B*S, T, C) sequences, as before it.
        os.environ[frame_attention.SWITCH] = "1" if "frames" in opts else "0"
        print("temporal attention kernel:", frame_attention.enable(dev, dt), flush=True)
        unet_module.TemporalTransformerBlock.forward = (
            _sequences_temporal_forward if "seqs" in opts else _TEMPORAL_FORWARD
        )
        # FlashAttention-4 for the spatial self-attention (img2vid.flash_attention) only with option "fa4".
        os.environ[flash_attention.SWITCH] = "1" if "fa4" in opts else "0"
        print("FlashAttention-4:", flash_attention.enable(dev, dt), flush=True)
        runtime.PERSISTENT_ROWS = 2048 if "pr2k" in opts else 1024
        t0 = time.perf_counter()
        if "cl" in opts or v == "channels_last":
            use_channels_last(unet)  # stays for the variants after this one
            inp = x.to(memory_format=torch.channels_last)
        uncompile_network(unet)
        if opts[0] == "compile":
            torch._dynamo.reset()
            cfg_ = torch._inductor.config
            cfg_.max_autotune_gemm = "max" in opts
            cfg_.coordinate_descent_tuning = "cd" in opts
            cfg_.triton.multi_kernel = 1 if "mk" in opts else 0
            _set_inductor_options(opts, inductor_defaults)
            from torch._inductor.choices import InductorChoices
            from torch._inductor.virtualized import V

            if "pr" in opts:  # runtime.use_inductor_heuristics, as the pipeline installs them
                runtime._heuristics.installed = False
                runtime.use_inductor_heuristics()
            else:
                V.set_choices_handler(InductorChoices())
            if hasattr(cfg_, "max_autotune_conv_backends"):
                cfg_.max_autotune_conv_backends = "ATEN"  # Triton convs lose to cuDNN here; skip tuning them
            mode = "reduce-overhead" if "cg" in opts else None
            if "regions" in opts:
                m = compile_network(unet, "regions", mode=mode)
            else:
                m = torch.compile(unet, fullgraph=True, dynamic=False, mode=mode)
            out = call(m, inp, split)
            torch.cuda.synchronize()
            results[f"{v}_compile_s"] = time.perf_counter() - t0
        s = bench(lambda m=m, inp=inp, split=split: call(m, inp, split))
        out = call(m, inp, split).float()
        if ref is None:
            ref = out
        results[f"{v}_s"] = s
        results[f"{v}_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        results[f"{v}_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
        results[f"{v}_rel_err_vs_first"] = ((out - ref).norm() / ref.norm()).item()
        print(json.dumps({k: v_ for k, v_ in results.items() if k.startswith(v)}), flush=True)
        if a.profile and opts[0] == "compile":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                call(m, inp, split)
                torch.cuda.synchronize()
            rows = []
            for e in prof.key_averages():
                t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
                rows.append((t / 1e3, e.count, e.key))
            rows.sort(reverse=True)
            results[f"{v}_kernel_ms_total"] = sum(r[0] for r in rows)
            Path(a.out, f"kernels_{v}.json").write_text(json.dumps(rows[:150], indent=0))
            for r in rows[:25]:
                print(f"{r[0]:9.2f} ms {r[1]:5d}  {r[2][:110]}", flush=True)
        Path(a.out, "profile_unet.json").write_text(json.dumps(results, indent=1))
    from torch.utils.flop_counter import FlopCounterMode

    uncompile_network(unet)

    with FlopCounterMode(display=False) as fc:
        call(unet, x)
    results["TFLOP_per_call"] = fc.get_total_flops() / 1e12
    for k in list(results):
        if k.endswith("_s") and not k.endswith("compile_s"):
            results[k.replace("_s", "_TFLOPs")] = results["TFLOP_per_call"] / results[k]
    Path(a.out, "profile_unet.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

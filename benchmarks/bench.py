"""End-to-end speed and memory of img2vid against diffusers, full-size SVD networks, random weights (GPU).

Timing and memory do not depend on the weights' values, so random weights measure exactly what the released
checkpoints would. Both pipelines get the SAME weights: diffusers' modules are built and randomised, and
img2vid loads them through its own diffusers key table.

    python benchmarks/bench.py --parts fast,diffusers,exact --out $OUT     # see README for the device command

Parts:
  fast       SVD-XT defaults (25 frames, 576x1024, 25 steps, euler, cfg 1.5->3.0) in fast mode: compile
             seconds, end-to-end seconds, UNet seconds per step, decode seconds, peak memory, TFLOP/s
  fast_plain the same without the fused GEGLU kernel of img2vid/gate_gemm.py (list it before fast)
  gate_ab    fast mode with that kernel off and on in alternation, three generations each, one pipeline
  frames_ab  the same for the temporal attention kernel of img2vid/frame_attention.py
  fa4_ab     the same for FlashAttention-4 in the spatial layers (img2vid/flash_attention.py; needs flash-attn-4)
  quack_ab   the same for GEGLU as one quack GEMM (img2vid/quack_geglu.py; needs quack-kernels)
  quack_tuned_ab  that GEMM in quack's default tile configuration and in its autotuned one, in alternation
  decode_profile  the CUDA kernels and FLOPs of fast mode's decode of 25 frames
  recompile  the same in a second process: the compile cache is reused across processes
  low        the same in low-memory mode (peak allocated must stay <= 8 GiB)
  svd        SVD (14 frames, 25 steps, cfg 1.0->2.5) in fast mode
  exact      compiled fp16 frames (saved by fast, low or svd for --exact-model) against fp32 eager frames of the
             same weights and inputs, --exact-steps steps
  diffusers  diffusers' StableVideoDiffusionPipeline, fp16 eager, decode_chunk_size 8, as
             shared/bench/diffusers_baseline.py measures it
  load       a full-size fp16 single file from the page cache to a GPU-ready pipeline

--memory-cap-gib N caps PyTorch's allocator at N GiB, as on a smaller card (e.g. `--parts low
--memory-cap-gib 7`): the parts then skip their extra measurements (eager decode, other decode chunks).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from img2vid import checkpoint, flash_attention, frame_attention, gate_gemm, quack_geglu  # noqa: E402
from img2vid.config import PRESETS  # noqa: E402
from img2vid.models import build, init_random  # noqa: E402
from img2vid.pipeline import Pipeline  # noqa: E402

REF_UNET_TFLOP = (
    159.9  # one UNet call, CFG batch 2 x 25 frames, 576x1024, as counted for the reference figures
)
DEV = torch.device("cuda")
W, H = 1024, 576


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def image() -> np.ndarray:
    return np.random.RandomState(0).randint(0, 256, (H, W, 3), dtype=np.uint8)


COMPILE = {"scope": True}  # --compile: the pipeline's default scope, or "regions" / "whole"
CAP = {"GiB": None}  # --memory-cap-gib


def random_pipeline(
    name: str, dtype: torch.dtype, memory: str = "fast", compile: bool | str = True
) -> Pipeline:
    cfg = PRESETS[name]
    nets = build(cfg, "meta")
    for i, net in enumerate(nets.values()):
        net.to_empty(device=DEV)
        init_random(net, seed=i)
        net.to(dtype)
    compile = COMPILE["scope"] if compile is True else compile
    return Pipeline(cfg, nets, DEV, dtype, source=f"{name} (random weights)").setup(
        memory, "benchmark", compile
    )


@contextlib.contextmanager
def uncompiled(pipe: Pipeline):
    """Run `pipe` eagerly inside the block, compiled as before after it (Dynamo's cache still holds the code)."""
    scope = pipe.compiled
    pipe.setup(pipe.memory, pipe.memory_reason, compile=False)
    try:
        yield pipe
    finally:
        pipe.setup(pipe.memory, pipe.memory_reason, compile=scope)


def measure(pipe: Pipeline, frames: int, steps: int, runs: int = 2, a_decode_chunks=()) -> dict:
    """Compile/warm-up, then `runs` timed end-to-end generations; per-step UNet and decode timings."""
    img = image()
    out: dict = {}
    t0 = time.perf_counter()
    pipe.generate(img, num_frames=frames, num_steps=2, seed=1)
    out["warmup_s"] = sync_time() - t0  # includes compiling the UNet for this shape
    step_times: list[float] = []
    e2e = []
    torch.cuda.reset_peak_memory_stats()
    for r in range(runs):
        last = [sync_time()]

        def cb(step, total, latents, last=last):
            now = sync_time()
            step_times.append(now - last[0])
            last[0] = now

        t = sync_time()
        video = pipe.generate(
            img, num_frames=frames, num_steps=steps, seed=1, callback=cb if r == runs - 1 else None
        )
        e2e.append(sync_time() - t)
    out["e2e_s"] = min(e2e)
    out["e2e_runs_s"] = e2e
    out["peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    out["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    out["resident_GiB"] = torch.cuda.memory_allocated() / 2**30
    free, total = torch.cuda.mem_get_info()
    out["device_used_GiB"] = (total - free) / 2**30  # the whole card: reserved memory, CUDA context, kernels
    out["unet_s_per_step"] = float(np.median(step_times[1:]))  # sampler step = one guided UNet evaluation
    # Decode alone, with the pipeline's own chunking.
    lat = torch.randn(frames, 4, H // 8, W // 8, device=DEV)
    pipe.decode(lat, pipe.default_decode_chunk())
    torch.cuda.reset_peak_memory_stats()
    t = sync_time()
    pipe.decode(lat, pipe.default_decode_chunk())
    out["decode_s"] = sync_time() - t
    out["decode_peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if CAP["GiB"]:  # under a memory cap: no extra measurements, they may need more than the mode's budget
        a_decode_chunks = ()
    for chunk in a_decode_chunks:  # what smaller decode chunks would cost in memory (they change the video)
        pipe.decode(lat, chunk)
        torch.cuda.reset_peak_memory_stats()
        t = sync_time()
        pipe.decode(lat, chunk)
        out[f"decode_chunk{chunk}_s"] = sync_time() - t
        out[f"decode_chunk{chunk}_peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if pipe.compiled and not CAP["GiB"]:  # the same decode without compiling, for comparison
        with uncompiled(pipe):
            pipe.decode(lat, pipe.default_decode_chunk())
            t = sync_time()
            pipe.decode(lat, pipe.default_decode_chunk())
            out["decode_eager_s"] = sync_time() - t
    out["frames_shape"] = list(video.frames.shape)
    if video.params.get("note"):  # e.g. an out-of-memory decode retried with fewer frames at a time
        out["note"] = video.params["note"]
    out["black_frames"] = int((video.frames.reshape(frames, -1).max(1) == 0).sum())
    return out


KEEP: dict = {}  # the fast pipeline, reused by the exactness check (compiling twice costs minutes)


def exact_frames_path(a, model: str) -> Path:
    return Path(a.tmp, f"img2vid_exact_{model}_{a.exact_steps}.npy")


def keep_exact_frames(a, pipe: Pipeline, model: str, mode: str) -> None:
    """Compiled fp16 frames for the exactness check (compared later with an fp32 eager run of the same weights
    and inputs), also on disk so that `--parts exact` can run in a process of its own."""
    if model != a.exact_model or ("exact", model) in KEEP:
        return
    frames = pipe.generate(image(), num_steps=a.exact_steps, seed=3).frames
    KEEP[("exact", model)] = frames, mode
    np.save(exact_frames_path(a, model), frames)
    exact_frames_path(a, model).with_suffix(".mode").write_text(mode)


def fast_pipeline() -> Pipeline:
    if "fast" not in KEEP:
        KEEP["fast"] = random_pipeline("svd-xt", torch.float16)
    return KEEP["fast"]


@torch.no_grad()
def compiled_vs_eager(pipe: Pipeline, frames: int) -> dict:
    """One guided UNet call and one decode, compiled against the same pipeline uncompiled, on the same inputs:
    the relative error (norm of the difference over the norm of the eager output)."""
    g = torch.Generator(DEV).manual_seed(5)
    B, fmt = 2 * frames, torch.channels_last
    x = torch.randn(B, 8, H // 8, W // 8, device=DEV, generator=g).to(pipe.dtype, memory_format=fmt)
    args = (
        torch.full((B,), 0.25 * 3.0, device=DEV),
        torch.randn(B, 1, 1024, device=DEV, generator=g).to(pipe.dtype),
        torch.tensor([[6.0, 127.0, 0.02]], device=DEV).expand(B, 3),
        frames,
    )
    z = torch.randn(14, 4, H // 8, W // 8, device=DEV, generator=g).to(pipe.dtype, memory_format=fmt)
    compiled = pipe.unet_forward(x, *args).float(), pipe.decoder_forward(z, 14).float()
    with uncompiled(pipe):
        eager = pipe.unet_forward(x, *args).float(), pipe.decoder_forward(z, 14).float()
    rel = [((c - e).norm() / e.norm()).item() for c, e in zip(compiled, eager, strict=True)]
    return {"unet_rel_err_compiled_vs_eager": rel[0], "decoder_rel_err_compiled_vs_eager": rel[1]}


def part_fast(a, res):
    pipe = fast_pipeline()
    kernels = {
        k: getattr(pipe, k) for k in ("fused_geglu", "frame_attention", "flash_attention", "gated_gemm")
    }
    r = kernels | measure(pipe, 25, a.steps)
    r.update(compiled_vs_eager(pipe, 25))
    r["unet_TFLOPs_ref_count"] = REF_UNET_TFLOP / r["unet_s_per_step"]
    res["fast"] = r
    keep_exact_frames(a, pipe, "svd-xt", "fast")


def part_fast_plain(a, res):
    """fast mode without the fused GEGLU kernel (IMG2VID_GATE_GEMM=0), as on GPUs other than Hopper: what the
    kernel gains on this card, in the same call. Run it before `fast`: the kernel, once on, is on process-wide."""
    os.environ[gate_gemm.SWITCH] = "0"
    try:
        pipe = random_pipeline("svd-xt", torch.float16)
        res["fast_plain"] = {"fused_geglu": pipe.fused_geglu} | measure(pipe, 25, a.steps)
    finally:
        del os.environ[gate_gemm.SWITCH]


def alternate(a, module, switch, name: str | None = None) -> dict:
    """A kernel off and on in alternation, three 25-step generations each, on one fast pipeline (Dynamo keeps
    the compiled graphs of both), so that a long call's clock drift falls on both alike. `switch(on)` turns the
    kernel on or off and says what `enable` decided. With `name`, calls of module.<name> (called by name at
    each call, at run time: not for what torch.compile traces) are counted in each generation."""
    pipe, img = fast_pipeline(), image()
    calls = [0]
    kernel = getattr(module, name) if name else None

    def counted(*args):
        calls[0] += 1
        return kernel(*args)

    if name:
        setattr(module, name, counted)
    r: dict = {"off": [], "on": [], "status": {}, "kernel_calls_per_generation": {}}
    try:
        for _ in range(3):
            for state in ("off", "on"):
                r["status"][state] = switch(state == "on")
                pipe.generate(img, num_frames=25, num_steps=2, seed=1)  # compiles, the first time
                calls[0] = 0
                t = sync_time()
                pipe.generate(img, num_frames=25, num_steps=a.steps, seed=1)
                r[state].append(sync_time() - t)
                if name:
                    r["kernel_calls_per_generation"][state] = calls[0]
    finally:
        if name:
            setattr(module, name, kernel)
        switch(True)
    r["mean_on_over_off"] = float(np.mean(r["on"]) / np.mean(r["off"]))
    return r


def switched(module, on: bool) -> str:
    """Turn a kernel module's use on or off through its environment switch and `enable`; what it decided."""
    os.environ[module.SWITCH] = "1" if on else "0"
    status = module.enable(DEV, torch.float16)
    os.environ.pop(module.SWITCH)
    return status


def part_gate_ab(a, res):
    """The fused GEGLU kernel (img2vid/gate_gemm.py) off and on in alternation."""
    res["gate_ab"] = alternate(a, gate_gemm, lambda on: switched(gate_gemm, on), name="gate_gemm")


def part_frames_ab(a, res):
    """The temporal attention kernel (img2vid/frame_attention.py) off, with the temporal layers on transposed
    sequences as before it, and on, with them in frame order, in alternation."""
    res["frames_ab"] = alternate(a, frame_attention, lambda on: switched(frame_attention, on))


def part_fa4_ab(a, res):
    """FlashAttention-4 for the spatial self-attention (img2vid/flash_attention.py) off, with cuDNN's kernel
    through scaled_dot_product_attention, and on, in alternation."""
    res["fa4_ab"] = alternate(a, flash_attention, lambda on: switched(flash_attention, on))


def part_quack_ab(a, res):
    """GEGLU as one quack GEMM (img2vid/quack_geglu.py) off, with the CUTLASS kernel of gate_gemm.py, and on,
    in alternation."""
    res["quack_ab"] = alternate(a, quack_geglu, lambda on: switched(quack_geglu, on))


def part_quack_tuned_ab(a, res):
    """quack's GEGLU GEMM in its default tile configuration (off) and autotuned (on), in alternation; the op reads
    quack_geglu.TUNED at each call, so nothing recompiles."""

    default = quack_geglu.TUNED

    def tuned(on: bool) -> str:
        quack_geglu.TUNED = on
        return f"tuned={on}"

    try:
        res["quack_tuned_ab"] = alternate(a, quack_geglu, tuned)
    finally:
        quack_geglu.TUNED = default


def part_decode_profile(a, res):
    """Where fast mode's decode of 25 frames (chunks of 14 and 11, compiled) spends its time: the CUDA kernels
    of one decode, and the decoder's FLOPs."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    pipe = fast_pipeline()
    lat = torch.randn(25, 4, H // 8, W // 8, device=DEV)
    chunk = pipe.default_decode_chunk()
    pipe.decode(lat, chunk)  # compiles, the first time
    t = sync_time()
    pipe.decode(lat, chunk)
    r = {"decode_s": sync_time() - t}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe.decode(lat, chunk)
        torch.cuda.synchronize()
    rows = sorted(
        ((getattr(e, "device_time_total", 0) / 1e3, e.count, e.key) for e in prof.key_averages()),
        reverse=True,
    )
    r["kernel_ms_total"] = sum(row[0] for row in rows)
    r["top_kernels"] = rows[:40]
    with uncompiled(pipe), FlopCounterMode(display=False) as fc:
        pipe.decode(lat[:chunk], chunk)
    r["TFLOP_per_decode"] = fc.get_total_flops() / 1e12 * len(lat) / chunk
    r["TFLOPs"] = r["TFLOP_per_decode"] / r["decode_s"]
    res["decode_profile"] = r
    for row in rows[:25]:
        print(f"{row[0]:9.2f} ms {row[1]:5d}  {row[2][:110]}", flush=True)


def part_recompile(a, res):
    """A fresh process compiles the same networks: Inductor's on-disk cache should make it quick. Reported:
    building the pipeline (random weights), then the first 2-step generation (compile from the cache, warm-up),
    and one more 2-step generation (nothing left to compile)."""
    code = (
        f"import sys, json, time; sys.argv=['x']; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import bench, torch; bench.COMPILE['scope']={COMPILE['scope']!r}; t0=time.perf_counter(); "
        "p=bench.random_pipeline('svd-xt', torch.float16); t1=bench.sync_time(); "
        "p.generate(bench.image(), num_frames=25, num_steps=2, seed=1); t2=bench.sync_time(); "
        "p.generate(bench.image(), num_frames=25, num_steps=2, seed=1); t3=bench.sync_time(); "
        "print('RESULT', json.dumps({'second_process_warmup_s': t2-t0, 'build_s': t1-t0, "
        "'first_generate_s': t2-t1, 'next_generate_s': t3-t2}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    res["recompile"] = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-2000:]}


def part_low(a, res):
    import gc

    KEEP.pop("fast", None)  # measure low mode's peak alone: drop the fast pipeline and its compiled code
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    pipe = random_pipeline("svd-xt", torch.float16, memory="low")
    res["low"] = measure(pipe, 25, a.steps, runs=1, a_decode_chunks=(14,))
    keep_exact_frames(a, pipe, "svd-xt", "low")  # if part_fast made none


def part_svd(a, res):
    pipe = random_pipeline("svd", torch.float16)
    res["svd_fast"] = measure(pipe, 14, a.steps, runs=1)
    keep_exact_frames(a, pipe, "svd", "fast")


def part_exact(a, res):
    """Compiled fp16 frames (made by part_fast, part_low or part_svd, for --exact-model) against fp32 eager frames
    of the same weights and inputs. The weights are redrawn with the same seeds in fp32 (the fp16 pipeline holds
    their fp16 rounding), TF32 off."""
    model = a.exact_model
    if ("exact", model) in KEEP:
        v16, mode = KEEP[("exact", model)]
    else:
        path = exact_frames_path(a, model)
        v16, mode = np.load(path), path.with_suffix(".mode").read_text()
    v16 = v16.astype(np.float32)
    frames = len(v16)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    try:
        nets = build(PRESETS[model], "meta")
        for i, net in enumerate(nets.values()):
            net.to_empty(device=DEV)
            init_random(net, seed=i)
        # The same batching and decode chunk as the frames compared with.
        ref = Pipeline(PRESETS[model], nets, DEV, torch.float32).setup(mode, "reference", compile=False)
        # cuDNN's algorithm search for every new fp32 shape cost ~85 s of run 11's 296 s; its heuristics suffice.
        torch.backends.cudnn.benchmark = False
        print(f"fp32 reference built ({model}, {mode} mode)", flush=True)
        t = time.perf_counter()

        def progress(step, total, latents):
            print(f"fp32 eager step {step}/{total}: {time.perf_counter() - t:.1f} s", flush=True)

        v32 = ref.generate(image(), num_steps=a.exact_steps, seed=3, callback=progress)
        v32 = v32.frames.astype(np.float32)
        seconds = time.perf_counter() - t
        print(f"fp32 eager generate: {seconds:.1f} s", flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = cudnn_benchmark
    d = np.abs(v16 - v32)
    res["exact"] = {
        "model": model,
        "frames": frames,
        "steps": a.exact_steps,
        "fast_frames_from": mode + " mode, compiled fp16",
        "fp32_eager_s": seconds,
        "mean_abs_diff_uint8": float(d.mean()),
        "p99_abs_diff_uint8": float(np.percentile(d, 99)),
        "max_abs_diff_uint8": float(d.max()),
        "nan": bool(np.isnan(v16).any()),
        "black_frames_fast": int((v16.reshape(frames, -1).max(1) == 0).sum()),
        "frame_std_fast": float(v16.std()),
        "frame_std_fp32": float(v32.std()),
    }


def part_diffusers(a, res):
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from svd_reference import XT_DIFFUSERS_CONFIGS as CFG  # the released configs
    from svd_reference import reference_pipeline  # the released scheduler settings, shared with the tests

    def args(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    dt = torch.float16
    torch.manual_seed(0)
    with torch.device(DEV):
        unet = UNetSpatioTemporalConditionModel(**args(CFG["unet"])).to(DEV, dt)
        vae = AutoencoderKLTemporalDecoder(**args(CFG["vae"])).to(DEV, dt)
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**CFG["image_encoder"])).to(DEV, dt)
    for m in (unet, vae, enc):
        init_random(m, seed=7)
    pipe = reference_pipeline(unet, vae, enc)
    pipe.set_progress_bar_config(disable=True)
    img = Image.fromarray(image())

    def run(steps, chunk=8):
        t = sync_time()
        pipe(
            img,
            height=H,
            width=W,
            num_frames=25,
            num_inference_steps=steps,
            decode_chunk_size=chunk,
            output_type="np",
            generator=torch.Generator(DEV).manual_seed(1),
        )
        return sync_time() - t

    run(2)
    torch.cuda.reset_peak_memory_stats()
    r = {"e2e_s": run(a.steps), "peak_alloc_GiB": torch.cuda.max_memory_allocated() / 2**30}
    # The same weights in img2vid, through its diffusers key table, copied into the already compiled fast
    # pipeline (same shapes: no recompile): a like-for-like second measurement.
    sds = {"unet": unet.state_dict(), "vae": vae.state_dict(), "image_encoder": enc.state_dict()}
    ours = fast_pipeline()
    mine = {
        c: m.state_dict()
        for c, m in (("unet", ours.unet), ("vae", ours.vae), ("image_encoder", ours.image_encoder))
    }
    ours_key = {c: {checkpoint.file_key(c, k): k for k in sd} for c, sd in mine.items()}
    copied = 0
    with torch.no_grad():
        for comp, sd in sds.items():
            for key, get in checkpoint._convert(
                comp, {k: (lambda t=t: t) for k, t in sd.items()}, PRESETS["svd-xt"]
            ):
                mine[comp][ours_key[comp][key]].copy_(get())
                copied += 1
    r["weights_copied"] = copied
    pipe = unet = vae = enc = sds = None
    torch.cuda.empty_cache()
    same = measure(ours, 25, a.steps, runs=1)
    r["img2vid_same_weights_e2e_s"] = same["e2e_s"]
    res["diffusers"] = r
    # Its weights are diffusers' now: a later part (fast, exact) must not take it for the pipeline of
    # random_pipeline's weights, which the fp32 reference of part_exact redraws. (In one call that ran
    # diffusers,fast,exact, exact compared different networks: RESULTS.md, run 42.)
    KEEP.pop("fast", None)


def part_load(a, res):
    """Write a full-size fp16 single file, read it once (page cache), then time load() to a ready pipeline."""
    from safetensors.torch import save_file

    pipe = random_pipeline("svd-xt", torch.float16, compile=False)
    tensors = {}
    for comp, net in (("unet", pipe.unet), ("vae", pipe.vae), ("image_encoder", pipe.image_encoder)):
        for k, v in net.state_dict().items():
            tensors[checkpoint.file_key(comp, k)] = v.contiguous().cpu()
    del pipe
    with tempfile.TemporaryDirectory(dir=a.tmp) as d:
        path = Path(d) / "svd_xt.safetensors"
        save_file(tensors, str(path))
        del tensors
        path.read_bytes()  # into the page cache
        import img2vid

        times = []
        for _ in range(2):
            t = time.perf_counter()
            p = img2vid.load(path, device="cuda", dtype=torch.float16, compile=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            del p
            torch.cuda.empty_cache()
        res["load"] = {"file_GB": path.stat().st_size / 1e9, "load_s": times}


PARTS = {
    "fast": part_fast,
    "fast_plain": part_fast_plain,
    "gate_ab": part_gate_ab,
    "frames_ab": part_frames_ab,
    "fa4_ab": part_fa4_ab,
    "quack_ab": part_quack_ab,
    "quack_tuned_ab": part_quack_tuned_ab,
    "decode_profile": part_decode_profile,
    "recompile": part_recompile,
    "low": part_low,
    "svd": part_svd,
    "exact": part_exact,
    "diffusers": part_diffusers,
    "load": part_load,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="fast,diffusers,low,exact")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--exact-steps", type=int, default=25)
    ap.add_argument("--exact-model", default="svd-xt", choices=["svd-xt", "svd"])
    ap.add_argument("--compile", default="default", choices=["default", "regions", "whole"])
    ap.add_argument(
        "--memory-cap-gib",
        type=float,
        help="cap PyTorch's allocator at this many GiB (a smaller card, simulated): a part that needs more "
        "fails with out-of-memory",
    )
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    COMPILE["scope"] = True if a.compile == "default" else a.compile
    if a.memory_cap_gib:
        CAP["GiB"] = a.memory_cap_gib
        total = torch.cuda.get_device_properties(DEV).total_memory
        torch.cuda.set_per_process_memory_fraction(
            a.memory_cap_gib * 2**30 / total, torch.cuda.current_device()
        )
    res = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "compile": a.compile,
        "memory_cap_GiB": a.memory_cap_gib,
    }
    for part in a.parts.split(","):
        t = time.perf_counter()
        try:
            PARTS[part](a, res)
        except Exception as e:  # report and go on: one broken part must not lose the others' figures
            import traceback

            traceback.print_exc()
            res[part] = {"error": f"{type(e).__name__}: {e}"}
        res.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t, 1)
        print(json.dumps({part: res.get(part) or res.get("svd_fast")}, default=str), flush=True)
        # A dropped pipeline whose blocks were compiled one by one is a reference cycle (each block holds its
        # compiled forward, which holds the block): without a collection its weights stayed on the GPU into the
        # next part (run 48: the diffusers part's UNet, 2.9 GiB, counted in fast mode's peak).
        gc.collect()
        torch.cuda.empty_cache()
        Path(a.out, "bench.json").write_text(json.dumps(res, indent=1, default=str))
    if "fast" in res and "diffusers" in res and "e2e_s" in res.get("diffusers", {}):
        res["ratio_fast_vs_diffusers_e2e"] = res["fast"]["e2e_s"] / res["diffusers"]["e2e_s"]
    if "fast_plain" in res and "diffusers" in res and "e2e_s" in res.get("diffusers", {}):
        res["ratio_fast_plain_vs_diffusers_e2e"] = res["fast_plain"]["e2e_s"] / res["diffusers"]["e2e_s"]
    if "low" in res and "fast" in res and "e2e_s" in res.get("low", {}):
        res["ratio_low_vs_fast_e2e"] = res["low"]["e2e_s"] / res["fast"]["e2e_s"]
    Path(a.out, "bench.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()

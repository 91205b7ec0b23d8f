"""img2vid against diffusers on a GPU, full-size SVD-XT with random weights (timing and memory do not depend on the
weights' values). Both read the same weights: one diffusers folder, written by the `setup` part.

    python benchmarks/bench.py --parts setup,first_video,steady --work /tmp/img2vid-bench --out results/

Parts (in the order given):
  setup        the folder (diffusers' own modules built from the released configs, random weights, fp16) and an
               input image under --work, read once so that they sit in the page cache as on a user's second run
  first_video  fresh processes, as a user runs them, each timed from its start with its phases (`--timings`):
               img2vid generate with an empty cache (the first run on a machine: eager, then it compiles), the
               same again (second run), the same with --no-compile, and the one-video diffusers script
               (diffusers_one_video.py) on the same folder; with `serve` in --runs, `img2vid serve` from its start
               to ready and to its first job finished
  steady       one process: img2vid's pipeline (default fast paths, compiled artifacts from the cache, built if
               missing) and diffusers' on the same weights: end to end, UNet seconds per step, decode, peak
               memory; and the compiled frames against eager frames of the same seed
  low          low memory mode: end to end and peak allocated memory
Settings: 25 frames at 576x1024, 25 steps, guidance 1.5->3.0, fp16; img2vid decodes 14 frames at a time (the
reference's), diffusers 8 (its script's choice). Results: a JSON per part under --out, a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
W, H, FRAMES, STEPS = 1024, 576, 25, 25
DEV = torch.device("cuda")


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def folder(a) -> Path:
    return Path(a.work) / "stable-video-diffusion-img2vid-xt-random"


def image_path(a) -> Path:
    return Path(a.work) / "photo.png"


def part_setup(a, res):
    """The diffusers folder and the image. diffusers' modules are built on the GPU and given img2vid's random
    weights (init_random), so the checkpoint is an ordinary diffusers folder that both tools load."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    sys.path.insert(0, str(ROOT / "tests"))
    from svd_reference import XT_DIFFUSERS_CONFIGS as CFG  # the released configs
    from svd_reference import reference_pipeline

    from img2vid.models import init_random

    Image.fromarray(np.random.RandomState(0).randint(0, 256, (H, W, 3), dtype=np.uint8)).save(image_path(a))
    out = folder(a)
    if not (out / "model_index.json").is_file():
        t = time.perf_counter()
        kw = {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in CFG.items()}
        with torch.device(DEV):
            unet = UNetSpatioTemporalConditionModel(**kw["unet"]).half()
            vae = AutoencoderKLTemporalDecoder(**kw["vae"]).half()
            enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**kw["image_encoder"])).half()
        for i, m in enumerate((unet, vae, enc)):
            init_random(m, seed=i)
        pipe = reference_pipeline(unet, vae, enc)
        assert isinstance(pipe, StableVideoDiffusionPipeline) and isinstance(
            pipe.feature_extractor, CLIPImageProcessor
        )
        pipe.save_pretrained(out, safe_serialization=True)
        res["setup_write_s"] = round(time.perf_counter() - t, 1)
    size = 0
    for f in out.rglob("*.safetensors"):
        size += len(f.read_bytes())  # into the page cache
    res["folder_GiB"] = round(size / 2**30, 2)


def run_timed(cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run a fresh process; its wall clock and, for img2vid, the `--timings` line it prints."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log.write_text(str(e.stdout or "") + str(e.stderr or ""))
        return {"wall_s": None, "exit": "timeout", "timeout_s": timeout}
    wall = time.perf_counter() - t
    log.write_text(p.stdout + p.stderr)
    out = {"wall_s": round(wall, 2), "exit": p.returncode}
    for line in p.stderr.splitlines():
        if line.startswith("img2vid: timings "):
            out["timings"] = json.loads(line.removeprefix("img2vid: timings "))
    if p.returncode:
        out["tail"] = (p.stdout + p.stderr)[-2000:]
    return out


def part_first_video(a, res):
    work = Path(a.work)
    runs = a.runs.split(",")
    cache = work / "cache-first-video"  # empty at the first run: nothing compiled on this machine yet
    if "first" in runs:
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    img2vid = [sys.executable, "-m", "img2vid", "generate", str(image_path(a)), "--model", str(folder(a))]
    img2vid += ["--steps", str(STEPS), "--frames", str(FRAMES), "--size", f"{W}x{H}", "--seed", "1"]
    img2vid += ["--timings", "--overwrite"]
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {"IMG2VID_CACHE": str(cache), "PYTHONPATH": path, "PYTHONFAULTHANDLER": "1"}
    script = [
        sys.executable,
        str(ROOT / "benchmarks" / "diffusers_one_video.py"),
        str(folder(a)),
        str(image_path(a)),
    ]
    log = Path(a.out) / "first_video_diffusers.log"
    if "diffusers" in runs:
        res["diffusers"] = r = run_timed([*script, str(work / "diffusers.mp4")], {}, log, a.timeout)
        print("diffusers", json.dumps(r), flush=True)
    for name, extra in (("first", []), ("second", []), ("no_compile", ["--no-compile"])):
        if name not in runs:
            continue
        out, log = work / f"{name}.mp4", Path(a.out) / f"first_video_{name}.log"
        res[name] = r = run_timed([*img2vid, "-o", str(out), *extra], env, log, a.timeout)
        print(name, json.dumps(r), flush=True)
        if r["exit"] != 0:
            break
    if "serve" in runs:
        res["serve"] = r = time_serve(a, env, Path(a.out) / "first_video_serve.log")
        print("serve", json.dumps(r), flush=True)
    base = res.get("diffusers", {}).get("wall_s")
    for name in ("first", "second", "no_compile"):
        if not base or not res.get(name, {}).get("wall_s"):
            continue
        res[name]["ratio_to_diffusers"] = round(res[name]["wall_s"] / base, 3)
        marks = res[name].get("timings", {}).get("marks", {})
        if "video 1 written" in marks:  # the first video's time, before any compiling after it
            res[name]["video_written_s"] = marks["video 1 written"]
            res[name]["video_ratio_to_diffusers"] = round(marks["video 1 written"] / base, 3)


def measure(pipe, runs: int = 2) -> dict:
    from PIL import Image

    img = Image.open(IMAGE[0])
    pipe.generate(img, num_frames=FRAMES, num_steps=2, seed=1)  # loads (or builds) the artifacts, warms up
    torch.cuda.reset_peak_memory_stats()
    e2e, steps = [], []
    for _ in range(runs):
        last = [sync_time()]

        def cb(step, total, latents, last=last):
            now = sync_time()
            steps.append(now - last[0])
            last[0] = now

        t = sync_time()
        video = pipe.generate(img, num_frames=FRAMES, num_steps=STEPS, seed=1, callback=cb)
        e2e.append(sync_time() - t)
    return {
        "e2e_s": round(min(e2e), 3),
        "e2e_runs_s": [round(x, 3) for x in e2e],
        "unet_s_per_step": round(float(np.median(steps[1:])), 4),
        "timings": video.params["timings"],
        "peak_alloc_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "frames": video.frames,
    }


IMAGE: list = []


def part_steady(a, res):
    import img2vid

    IMAGE[:] = [image_path(a)]
    os.environ.setdefault("IMG2VID_CACHE", str(Path(a.work) / "cache-first-video"))
    pipe = img2vid.load(folder(a), dtype="fp16", memory="fast")
    res["accel"] = pipe.accel.as_dict()
    fast = measure(pipe, runs=1 if pipe.compiled_backend() == "jit" else 2)
    missing = pipe.missing_compiled()
    if missing:  # no artifacts yet: build them, then measure again
        res["before_build"] = {k: v for k, v in fast.items() if k != "frames"}
        print("steady before build", json.dumps(res["before_build"]), flush=True)
        t = time.perf_counter()
        pipe.build_missing(progress=print)
        res["build_s"] = round(time.perf_counter() - t, 1)
        fast = measure(pipe)
    print("steady fast", json.dumps({k: v for k, v in fast.items() if k != "frames"}), flush=True)
    res["fast"] = {k: v for k, v in fast.items() if k != "frames"}
    if a.skip_eager:
        del pipe
        torch.cuda.empty_cache()
        res["diffusers"] = diffusers_in_process(a)
        res["fast_ratio_to_diffusers"] = round(res["fast"]["e2e_s"] / res["diffusers"]["e2e_s"], 3)
        return
    eager = img2vid.load(
        folder(a), dtype="fp16", memory="fast", accel=["channels_last", "flash_attention", "quack_geglu"]
    )
    plain = measure(eager, runs=1)
    res["eager"] = {k: v for k, v in plain.items() if k != "frames"}
    d = np.abs(fast["frames"].astype(np.float32) - plain["frames"].astype(np.float32))
    res["compiled_vs_eager_frames"] = {
        "mean_abs_uint8": float(d.mean()),
        "max_abs_uint8": float(d.max()),
        "nan": bool(np.isnan(d).any()),
    }
    del pipe, eager
    torch.cuda.empty_cache()
    res["diffusers"] = diffusers_in_process(a)
    res["fast_ratio_to_diffusers"] = round(res["fast"]["e2e_s"] / res["diffusers"]["e2e_s"], 3)


def diffusers_in_process(a) -> dict:
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image

    pipe = StableVideoDiffusionPipeline.from_pretrained(folder(a), torch_dtype=torch.float16).to(DEV)
    pipe.set_progress_bar_config(disable=True)
    img = Image.open(image_path(a))

    def run(steps):
        t = sync_time()
        pipe(img, height=H, width=W, num_frames=FRAMES, num_inference_steps=steps, decode_chunk_size=8,
             output_type="np", generator=torch.Generator(DEV).manual_seed(1))  # fmt: skip
        return sync_time() - t

    run(2)
    torch.cuda.reset_peak_memory_stats()
    return {
        "e2e_s": round(run(STEPS), 3),
        "peak_alloc_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def _post_job(url: str, image: Path, fields: dict) -> str:
    """POST /v1/jobs as multipart form data; the job id."""
    import urllib.request
    import uuid

    b = uuid.uuid4().hex
    parts = [
        f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    head = f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"\r\n\r\n'.encode()
    body = b"".join(parts) + head + image.read_bytes() + f"\r\n--{b}--\r\n".encode()
    req = urllib.request.Request(
        url + "/v1/jobs", body, {"Content-Type": f"multipart/form-data; boundary={b}"}
    )
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)["id"]


def time_serve(a, env: dict, log: Path, port: int = 7861) -> dict:
    """`img2vid serve` in a fresh process: seconds from its start to ready (/readyz 200) and to the first job
    finished (the same settings as the CLI runs)."""
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "img2vid", "serve", "--model", str(folder(a)), "--port", str(port)]
    cmd += ["--data", str(Path(a.work) / "serve-data"), "--log-level", "info"]
    out, t0 = {}, time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT)
    try:
        while time.perf_counter() - t0 < a.timeout and "ready_s" not in out:
            try:
                urllib.request.urlopen(url + "/readyz", timeout=1).close()
                out["ready_s"] = round(time.perf_counter() - t0, 2)
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        fields = {"num_steps": STEPS, "num_frames": FRAMES, "width": W, "height": H, "seed": 1}
        job = _post_job(url, image_path(a), fields)
        while time.perf_counter() - t0 < a.timeout:
            with urllib.request.urlopen(f"{url}/v1/jobs/{job}", timeout=5) as resp:
                status = json.load(resp)["status"]
            if status in ("succeeded", "failed", "canceled"):
                out.update(status=status, first_job_s=round(time.perf_counter() - t0, 2))
                break
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def part_low(a, res):
    import img2vid

    IMAGE[:] = [image_path(a)]
    os.environ.setdefault("IMG2VID_CACHE", str(Path(a.work) / "cache-first-video"))
    pipe = img2vid.load(folder(a), dtype="fp16", memory="low")
    r = measure(pipe, runs=1)
    if pipe.missing_compiled() and pipe.compiled_backend() == "aot":  # a jit build would take minutes here
        pipe.build_missing(progress=print)
        r = measure(pipe, runs=1)
    res.update({k: v for k, v in r.items() if k != "frames"})
    res["accel"] = pipe.accel.as_dict()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="setup,first_video,steady")
    p.add_argument("--work", default="/tmp/img2vid-bench", help="the weights, image, videos and caches")
    p.add_argument("--out", default="bench-results", help="a JSON per part, and the logs")
    p.add_argument(
        "--runs", default="diffusers,first,second,no_compile", help="first_video's processes (also: serve)"
    )
    p.add_argument("--skip-eager", action="store_true", help="steady: no eager run to compare frames with")
    p.add_argument("--timeout", type=float, default=480, help="seconds for each fresh process of first_video")
    a = p.parse_args()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    card = torch.cuda.get_device_name()
    for part in a.parts.split(","):
        res = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        t = time.perf_counter()
        try:
            globals()[f"part_{part}"](a, res)
        except Exception as e:  # keep what the other parts measure
            res["error"] = f"{type(e).__name__}: {e}"
            import traceback

            traceback.print_exc()
        res["part_s"] = round(time.perf_counter() - t, 1)
        (Path(a.out) / f"{part}.json").write_text(json.dumps(res, indent=1, default=str))
        print(f"=== {part}: {json.dumps(res, default=str)[:3000]}", flush=True)


if __name__ == "__main__":
    main()

"""Where one full-size SVD-XT UNet call (guidance batch 2 x 25 frames, 576x1024, fp16) spends its time (GPU).

    python benchmarks/profile_unet.py [--accel auto] [--top 25]

Random weights: timing does not depend on the values. Builds the pipeline's UNet with the fast paths asked for
(the compiled artifact comes from img2vid's cache, and is built first if missing), times the call, and prints the
CUDA kernels that took the most time in it (torch.profiler).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from img2vid.config import PRESETS  # noqa: E402
from img2vid.models import build, init_random  # noqa: E402
from img2vid.pipeline import Pipeline  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accel", default="auto", help="fast paths, as img2vid.load's accel")
    p.add_argument("--top", type=int, default=25, help="kernels to list")
    a = p.parse_args()
    dev, cfg, frames = torch.device("cuda"), PRESETS["svd-xt"], 25
    nets = build(cfg, "meta")
    for i, net in enumerate(nets.values()):
        net.to_empty(device=dev)
        init_random(net, seed=i)
        net.half()
    pipe = Pipeline(cfg, nets, dev, torch.float16, source="random weights").setup("fast", "profile", a.accel)
    print("\n".join(pipe.accel.lines()))
    g = torch.Generator(dev).manual_seed(0)
    B = 2 * frames
    x = (
        torch.randn(B, 8, 72, 128, device=dev, generator=g)
        .half()
        .contiguous(memory_format=pipe.memory_format)
    )
    args = (
        torch.full((B,), 0.75, device=dev),
        torch.randn(B, 1, 1024, device=dev, generator=g).half(),
        torch.tensor([[6.0, 127.0, 0.02]], device=dev).expand(B, 3).contiguous(),
        frames,
    )
    with torch.no_grad():
        pipe.unet_forward(x, *args)
        if pipe.missing_compiled():
            pipe.build_missing(progress=print)
        for _ in range(3):
            pipe.unet_forward(x, *args)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            pipe.unet_forward(x, *args)
        torch.cuda.synchronize()
        print(f"UNet call: {(time.perf_counter() - t) / 5:.4f} s")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            pipe.unet_forward(x, *args)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.top))


if __name__ == "__main__":
    main()

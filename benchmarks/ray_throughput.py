"""Jobs per minute of the job queue with its workers as Ray CPU actors (1 CPU each), against one actor.

    python benchmarks/ray_throughput.py --actors 1,2 --jobs 12

Each setting starts its actors on a local Ray (num_cpus = the largest setting), loads the tiny model
(random weights) in each, runs one warm-up job per actor, then times `--jobs` jobs from the moment they
are queued until the last one is stored: the same store and dispatcher `img2vid serve --ray` runs, without
HTTP. Prints one JSON line per setting and the speed-up against the first setting.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np
import ray
from PIL import Image

import img2vid
from img2vid.server.dispatcher import Dispatcher
from img2vid.server.ray_worker import RayWorker
from img2vid.server.store import JobStore

PARAMS = {"width": 256, "height": 256, "num_frames": 4, "num_steps": 8, "seed": 1}


def png() -> bytes:
    a = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def run_jobs(store: JobStore, dispatcher: Dispatcher, count: int) -> float:
    """Seconds from queueing `count` jobs to the last one finished; raises if any failed."""
    image = png()
    start = time.perf_counter()
    ids = [store.create(dict(PARAMS), image, ".png", "image/png").id for _ in range(count)]
    dispatcher.wake()
    # Polled slowly: on a small host this process shares the cores with the actors it measures.
    while store.count("queued") + store.count("running"):
        time.sleep(0.25)
    elapsed = time.perf_counter() - start
    failed = [store.get(i).error for i in ids if store.get(i).status != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed: {failed[0]}")
    return elapsed


def measure(actors: int, jobs: int) -> dict:
    load = functools.partial(img2vid.load, "tiny", device="cpu")
    workers = [RayWorker(load, {"num_cpus": 1}, name="tiny") for _ in range(actors)]
    with tempfile.TemporaryDirectory(prefix="img2vid-ray-bench-") as data:
        store = JobStore(data)
        dispatcher = Dispatcher(store, workers, poll_s=1.0)  # woken when jobs are queued
        dispatcher.start()
        try:
            while not all(w.ready() for w in workers):
                time.sleep(0.1)
            run_jobs(store, dispatcher, actors)  # warm-up: one job per actor
            cpu = time.process_time()
            elapsed = run_jobs(store, dispatcher, jobs)
            cpu = time.process_time() - cpu
        finally:
            dispatcher.stop()
            for w in workers:
                w.close()
            store.close()
    # api_cpu_s: CPU time of this process (dispatcher, progress, storing videos) while the jobs ran.
    per_min = jobs / elapsed * 60
    return {
        "actors": actors,
        "jobs": jobs,
        "seconds": round(elapsed, 2),
        "jobs_per_min": per_min,
        "api_cpu_s": cpu,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--actors", default="1,2", help="comma-separated actor counts (default 1,2)")
    p.add_argument("--jobs", type=int, default=12, help="timed jobs per setting (default 12)")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.actors.split(",")]
    ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
    threads = ray.get(ray.remote(num_cpus=1)(_torch_threads).remote())
    results = []
    try:
        for n in counts:
            result = measure(n, args.jobs)
            result["speedup"] = (
                round(result["jobs_per_min"] / results[0]["jobs_per_min"], 3) if results else 1.0
            )
            result["jobs_per_min"] = round(result["jobs_per_min"], 1)
            result["api_cpu_s"] = round(result["api_cpu_s"], 2)
            result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            results.append(result)
            print(json.dumps({**result, "params": PARAMS, "actor_threads": threads}), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

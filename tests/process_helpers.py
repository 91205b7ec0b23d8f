"""Model loaders for the tests that run a ProcessWorker: its child process imports them from here by name."""

from __future__ import annotations

import os
import signal
import time

import img2vid
from img2vid import memory


class DiesOnSeed666:
    """The tiny pipeline, except that seed 666 kills its process, as the kernel's out-of-memory killer would."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, image, **kwargs):
        if kwargs.get("seed") == 666:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.pipe.generate(image, **kwargs)


def tiny_in_300_mb_that_dies_on_seed_666():
    memory.free_bytes = lambda device: 300 * 2**20
    return DiesOnSeed666(img2vid.load("tiny", device="cpu"))


class OomOnSeed777(DiesOnSeed666):
    """The tiny pipeline, except that seed 777 raises CUDA's out-of-memory error, as a GPU would mid-job."""

    def generate(self, image, **kwargs):
        if kwargs.get("seed") == 777:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.pipe.generate(image, **kwargs)


class SlowOnSeed4242(OomOnSeed777):
    """Also: seed 4242 takes a second a step, so that a test can act on a job that is surely running."""

    def generate(self, image, **kwargs):
        if kwargs.get("seed") == 4242:
            callback = kwargs["callback"]  # a worker's: it takes one img2vid.progress.Progress

            def slow(progress):
                if progress.phase == "sampling" and progress.step:
                    time.sleep(1)
                return callback(progress)

            kwargs["callback"] = slow
        return super().generate(image, **kwargs)


def tiny_with_faults():
    """The tiny model with seed 777 out of GPU memory and seed 4242 slow (for Ray actors and servers run as
    a separate process, which import this module by name)."""
    return SlowOnSeed4242(img2vid.load("tiny", device="cpu"))

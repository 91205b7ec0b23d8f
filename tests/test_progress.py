"""Progress reports and live previews: the sampler hands over its denoised estimate without changing the result,
generate reports every phase, previews are the latent->RGB map of every frame, and their encoding is throttled."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import img2vid
from img2vid import preview, sampling
from img2vid.progress import LATENT_RGB, Progress, latent_preview


@pytest.fixture(scope="module")
def tiny():
    return img2vid.load("tiny", device="cpu")


def test_latent_preview_is_the_sd_latent_rgb_map():
    z = torch.zeros(2, 4, 3, 5)
    z[0, 0] = 1.0  # frame 0: the first latent channel only -> its row of factors, mapped from [-1, 1]
    z[1, 3] = -10.0  # frame 1: far out of range -> clamped
    out = latent_preview(z)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 5, 3)
    expect = [round((f + 1) / 2 * 255) for f in LATENT_RGB[0]]
    assert out[0, 1, 2].tolist() == expect
    assert out[1, 0, 0].tolist() == [255, 255, 255]  # -10 * (-0.2120, -0.2616, -0.7177) is far above 1


@pytest.mark.parametrize("name", list(sampling.SAMPLERS))
def test_samplers_hand_over_the_denoised_estimate_and_the_same_result(name):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 3, generator=gen)
    calls = []

    def denoise(x, sigma):  # a toy denoiser that moves towards x0
        out = x0 + 0.1 * x / (1 + sigma)
        calls.append(out)
        return out

    sigmas = sampling.edm_sigmas(4)
    plain = sampling.SAMPLERS[name](denoise, sampling.initial_latents(x0, sigmas), sigmas)
    calls.clear()
    seen = []
    got = sampling.SAMPLERS[name](
        denoise, sampling.initial_latents(x0, sigmas), sigmas, lambda s, t, x, d: seen.append((s, t, d))
    )
    assert torch.equal(plain, got)
    assert [(s, t) for s, t, _ in seen] == [(i, 4) for i in range(1, 5)]
    # each step's estimate is a network output of that step (Heun: the first of its two calls)
    assert all(any(d is c for c in calls) for _, _, d in seen)
    assert seen[0][2] is calls[0]


def test_generate_reports_every_phase_with_previews(tiny):
    seen: list[Progress] = []
    video = tiny.generate(
        np.zeros((256, 320, 3), np.uint8), width=320, height=256, num_frames=3, num_steps=2, seed=1,
        callback=seen.append,
    )  # fmt: skip
    phases = [(p.phase, p.step) for p in seen]
    assert phases == [
        ("loading", 0),
        ("conditioning", 0),
        ("sampling", 0),
        ("sampling", 1),
        ("sampling", 2),
        ("decoding", 2),
    ]
    steps = [p for p in seen if p.phase == "sampling" and p.step]
    assert all(p.preview.shape == (3, 32, 40, 3) and p.preview.dtype == np.uint8 for p in steps)
    assert steps[-1].eta_s == 0 and all(p.eta_s is None for p in seen if p.phase != "sampling")
    assert seen[0].preview is None
    assert np.array_equal(steps[-1].preview, latent_preview(steps[-1].denoised).numpy())
    assert video.num_frames == 3


def test_a_progress_callback_can_stop_while_decoding(tiny):
    def stop_at_decoding(p):
        return p.phase != "decoding"

    with pytest.raises(img2vid.Cancelled, match="after step 2 of 2"):
        tiny.generate(
            np.zeros((256, 256, 3), np.uint8), width=256, height=256, num_frames=2, num_steps=2,
            callback=stop_at_decoding,
        )  # fmt: skip


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_throttle_keeps_previews_within_the_budget():
    clock = Clock()
    throttle = preview.Throttle(budget=0.01, clock=clock)

    def make():
        clock.now += 0.05  # each preview costs 50 ms
        return b"x"

    made = []
    for _ in range(100):
        clock.now += 1.0  # one step
        made.append(throttle.run(make) is not None)
    assert made[0]  # the first is always made
    assert throttle.spent <= 0.01 * clock.now + 0.05  # never more than the budget, but for one preview
    assert 10 <= sum(made) <= 21  # 100 s of steps at 1% buys about 20 previews of 50 ms
    assert not made[1]  # right after the first, the budget is spent


@pytest.mark.parametrize("suffix", [".webp", ".gif"])
def test_encode_animates_every_frame(suffix):
    frames = np.stack([np.full((8, 12, 3), 40 * i, np.uint8) for i in range(5)])
    data = preview.encode(frames, fps=7, suffix=suffix)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == preview.FORMATS[suffix][0]
        assert im.size == (12, 8) and im.n_frames == 5 and im.is_animated


def test_png_preview_is_a_strip_of_the_frames():
    frames = np.stack([np.full((8, 12, 3), 40 * i, np.uint8) for i in range(5)])
    with Image.open(io.BytesIO(preview.encode(frames, fps=7, suffix=".png"))) as im:
        strip = np.asarray(im.convert("RGB"))
    assert strip.shape == (8, 60, 3) and np.array_equal(strip[:, 24:36], frames[2])


def test_write_atomic_replaces_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "p.webp"
    preview.write_atomic(target, b"one")
    preview.write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["p.webp"]


def test_the_eta_of_a_later_segment_counts_only_its_own_steps(monkeypatch):
    from types import SimpleNamespace

    from img2vid import progress

    clock = Clock()
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=clock))
    seen = []
    report = progress.Reporter(seen.append, total=4)  # two segments (generate's extend) of two steps
    for segment in range(2):
        clock.now += 10.0  # conditioning (and, before the second, the first one's decoding)
        report.phase("sampling")
        for step in (1, 2):
            clock.now += 1.0  # a second a step
            report.on_step(2 * segment + step, 4, torch.zeros(1), torch.zeros(1, 4, 1, 1))
    assert [p.eta_s for p in seen if p.latents is not None] == [3.0, 2.0, 1.0, 0.0]  # the steps

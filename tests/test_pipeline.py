"""Image to video end to end against diffusers' StableVideoDiffusionPipeline on the same random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import img2vid
from img2vid import sampling
from img2vid.pipeline import clip_preprocess, resize_antialias, to_uint8

H, W, T, STEPS = 256, 320, 3, 4  # non-square, odd frame count


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    pytest.importorskip("diffusers")
    from svd_reference import save_tiny_folder

    folder = tmp_path_factory.mktemp("svd") / "tiny-svd-xt"
    ref = save_tiny_folder(folder)
    ref.set_progress_bar_config(disable=True)
    return ref, img2vid.load(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny():
    return img2vid.load("tiny", device="cpu")


def test_matches_diffusers_pipeline(pair):
    ref, pipe = pair
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (H, W, 3), dtype=np.uint8))
    seed = 5
    # diffusers draws the conditioning noise first from its generator; the latents we pass in.
    cond_noise = torch.randn((1, 3, H, W), generator=torch.Generator().manual_seed(seed))
    noise = torch.randn((T, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(99))
    expect = ref(
        img,
        height=H,
        width=W,
        num_frames=T,
        num_inference_steps=STEPS,
        min_guidance_scale=1.0,
        max_guidance_scale=2.5,
        fps=7,  # diffusers subtracts 1: fps_id 6
        motion_bucket_id=100,
        noise_aug_strength=0.05,
        decode_chunk_size=T,
        generator=torch.Generator().manual_seed(seed),
        latents=noise[None].clone(),
        output_type="pt",
    ).frames[0]  # (T, 3, H, W) in [0, 1]

    final = {}

    def keep(step, total, latents):
        final[step] = latents.clone()

    video = pipe.generate(
        img,
        num_frames=T,
        num_steps=STEPS,
        min_cfg=1.0,
        max_cfg=2.5,
        fps_id=6,
        motion_bucket_id=100,
        cond_aug=0.05,
        noise=noise,
        cond_noise=cond_noise[0],
        width=W,
        height=H,
        decode_chunk_size=T,
        callback=keep,
    )
    assert sorted(final) == list(range(1, STEPS + 1))
    frames, _ = pipe.decode(final[STEPS], T)
    frames = frames.cpu()
    assert frames.std() > 0.05  # not a flat image: the comparison means something
    err = (frames - expect).abs().max().item()
    assert err <= 1e-3, f"frames differ from diffusers by {err:.2e}"
    assert np.array_equal(video.frames, to_uint8(frames))
    assert video.frames.shape == (T, H, W, 3) and video.fps == 7
    assert video.params["width"] == W and video.params["num_steps"] == STEPS


def test_clip_resize_matches_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )

    for h, w in ((576, 1024), (256, 320), (1024, 576), (224, 224), (100, 150)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h)) * 2 - 1
        torch.testing.assert_close(resize_antialias(x, (224, 224)), _resize_with_antialiasing(x, (224, 224)))
    x = torch.zeros(1, 3, 64, 64)
    out = clip_preprocess(x, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    torch.testing.assert_close(out, torch.zeros(1, 3, 224, 224))  # -1..1 -> 0..1 -> normalised


def test_sigmas_match_diffusers_karras_schedule():
    pytest.importorskip("diffusers")
    from svd_reference import tiny_pipeline

    sched = tiny_pipeline().scheduler
    sched.set_timesteps(25)
    torch.testing.assert_close(sampling.edm_sigmas(25), sched.sigmas.float(), rtol=1e-6, atol=0)
    assert sampling.edm_sigmas(25)[0] == pytest.approx(700.0) and sampling.edm_sigmas(25)[
        -2
    ] == pytest.approx(0.002)


def test_guidance_shapes():
    torch.testing.assert_close(
        sampling.guidance_scales("linear", 1.0, 3.0, 5), torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0])
    )
    torch.testing.assert_close(
        sampling.guidance_scales("triangle", 1.0, 3.0, 5), torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0])
    )
    torch.testing.assert_close(
        sampling.guidance_scales("constant", 1.0, 3.0, 3), torch.tensor([3.0, 3.0, 3.0])
    )


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_samplers_solve_the_ode_for_gaussian_data(name):
    """For data ~ N(0, s^2) the ideal denoiser is x s^2/(s^2+sigma^2) and the probability-flow ODE has the exact
    solution x(0) = x_T s / sqrt(s^2 + sigma_max^2). Errors must shrink with more steps; 2nd order beats Euler."""
    s = 0.5
    x_T = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 700.0

    def denoise(x, sigma):
        return x * s**2 / (s**2 + sigma**2)

    exact = x_T * s / (s**2 + 700.0**2) ** 0.5

    def err(n):
        return (sampling.SAMPLERS[name](denoise, x_T, sampling.edm_sigmas(n)) - exact).abs().max().item()

    e10, e40 = err(10), err(40)
    assert e40 < e10 / 2
    if name != "euler":
        euler40 = (sampling.sample_euler(denoise, x_T, sampling.edm_sigmas(40)) - exact).abs().max().item()
        assert e40 < euler40 / 3
        assert err(80) < e40 / 3  # second order: twice the steps, about a quarter of the error


def test_same_seed_same_frames_other_seed_differs(tiny):
    img = Image.fromarray(np.random.RandomState(1).randint(0, 256, (300, 400, 3), dtype=np.uint8))
    kw = dict(width=256, height=256, num_frames=3, num_steps=2)
    a = tiny.generate(img, seed=7, **kw).frames
    b = tiny.generate(img, seed=7, **kw).frames
    c = tiny.generate(img, seed=8, **kw).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_defaults_and_params_are_recorded(tiny):
    img = np.full((256, 256, 3), 128, np.uint8)
    video = tiny.generate(img, width=256, height=256, num_steps=1)
    d = tiny.defaults
    assert video.frames.shape == (d["num_frames"], 256, 256, 3)
    p = video.params
    assert p["model"] == "tiny" and p["num_frames"] == d["num_frames"] and isinstance(p["seed"], int)
    assert (p["min_cfg"], p["max_cfg"]) == (d["min_cfg"], d["max_cfg"])


def test_callback_can_cancel(tiny):
    seen = []

    def stop_after_two(step, total, latents):
        seen.append((step, total))
        return step < 2

    with pytest.raises(img2vid.Cancelled):
        tiny.generate(
            np.zeros((256, 256, 3), np.uint8), width=256, height=256, num_steps=5, callback=stop_after_two
        )
    assert seen == [(1, 5), (2, 5)]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_frames": 0}, "num_frames"),
        ({"sampler": "ddim"}, "sampler"),
        ({"guidance": "cosine"}, "guidance"),
        ({"width": 300, "height": 256}, "width"),
        ({"noise": torch.zeros(2, 4, 4, 4)}, "noise"),
        ({"cond_noise": torch.zeros(3, 8, 8)}, "cond_noise"),
        ({"extend": -1}, "extend"),
        ({"extend": 17}, "extend"),
        ({"extend": 1.5}, "extend"),
        ({"loop": "bounce"}, "loop"),
        ({"watermark": "maybe"}, "watermark"),
    ],
)
def test_bad_parameters_name_the_field(tiny, kwargs, field):
    with pytest.raises(img2vid.ParameterError) as e:
        tiny.generate(np.zeros((256, 256, 3), np.uint8), **{"width": 256, "height": 256, **kwargs})
    assert e.value.field == field


def test_user_sigmas_and_constant_guidance(tiny):
    sig = torch.tensor([10.0, 1.0, 0.1, 0.0])
    v = tiny.generate(
        np.zeros((256, 256, 3), np.uint8), width=256, height=256, sigmas=sig, guidance="constant", seed=1
    )
    assert v.params["num_steps"] == 3


def test_low_memory_mode_gives_the_same_video(tiny):
    """Low-memory mode runs the guidance halves one after the other; the numbers must not change beyond
    floating-point reassociation."""
    img = np.random.RandomState(3).randint(0, 256, (256, 256, 3), dtype=np.uint8)
    kw = dict(width=256, height=256, num_frames=3, num_steps=2, seed=4)
    fast = tiny.generate(img, **kw).frames.astype(int)
    try:
        tiny.setup("low")
        low = tiny.generate(img, **kw).frames.astype(int)
    finally:
        tiny.setup("fast")
    assert np.abs(fast - low).max() <= 1


@pytest.mark.parametrize(
    "env, changed",
    [
        ({}, True),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, False),
        ({"PYTORCH_ALLOC_CONF": ""}, False),
    ],
)
def test_low_mode_makes_allocator_segments_expandable_unless_the_user_chose(monkeypatch, env, changed):
    """Low mode asks PyTorch's CUDA allocator for expandable segments (fixed ones fragmented an 8 GB budget), but
    never overrides an allocator configuration the user set. The CUDA side is replaced by a recorder here."""
    from img2vid import memory

    for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    assert memory.use_expandable_segments() is changed
    assert calls == (["expandable_segments:True"] if changed else [])


def test_channels_last_weights_change_nothing():
    """The GPU layout (NHWC/NDHWC weights and inputs) must give the same numbers; checked here on the CPU."""
    from img2vid.accel import layout

    a = img2vid.load("tiny", device="cpu")
    b = img2vid.load("tiny", device="cpu")
    layout.to_channels_last(b.unet)
    layout.to_channels_last(b.vae)
    assert (
        b.unet.input_blocks[1][0]
        .time_stack.in_layers[2]
        .weight.is_contiguous(memory_format=torch.channels_last_3d)
    )
    x = torch.randn(6, 8, 32, 32)
    args = (torch.zeros(6), torch.randn(6, 1, 32), torch.randn(6, 3), 3)
    with torch.no_grad():
        torch.testing.assert_close(
            b.unet(x.contiguous(memory_format=torch.channels_last), *args),
            a.unet(x, *args),
            rtol=1e-4,
            atol=1e-4,
        )
        z = torch.randn(3, 4, 32, 32)
        torch.testing.assert_close(
            b.vae.decode(z.contiguous(memory_format=torch.channels_last), 3),
            a.vae.decode(z, 3),
            rtol=1e-4,
            atol=1e-4,
        )


def test_decode_retries_smaller_chunks_on_out_of_memory(tiny, caplog):
    """A decode that runs out of GPU memory is retried with half the chunk, and the video says so."""
    real = tiny.decoder_forward
    seen = []

    def flaky(z, num_frames):
        seen.append(num_frames)
        if num_frames > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(z, num_frames)

    tiny.decoder_forward = flaky
    try:
        with caplog.at_level("WARNING", logger="img2vid"):
            v = tiny.generate(
                np.zeros((256, 256, 3), np.uint8), width=256, height=256, num_frames=3, num_steps=1
            )
    finally:
        tiny.decoder_forward = real
    assert seen[:2] == [3, 2] and v.params["decode_chunk_size"] == 1
    assert "out of memory" in v.params["note"] and "retrying with 1" in caplog.text


def test_shapes_without_artifacts_run_eagerly_then_are_built(monkeypatch, tmp_path):
    """With the compiled path on (forced here on the CPU), a video at a new size runs eagerly and names what is
    missing; build_missing builds exactly those (the build itself is tested in test_accel), warmup runs a step at
    the asked size first."""
    from img2vid.accel import compiled

    monkeypatch.setenv("IMG2VID_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled, "unavailable", lambda device, dtype, memory: None)
    pipe = img2vid.load("tiny", device="cpu", accel="compiled")
    assert pipe.accel.on("compiled") and pipe.missing_compiled() == []
    plain = img2vid.load("tiny", device="cpu", accel="none")
    image = np.zeros((256, 384, 3), np.uint8)
    a = pipe.generate(image, num_frames=3, num_steps=2, seed=1, width=384, height=256)
    b = plain.generate(image, num_frames=3, num_steps=2, seed=1, width=384, height=256)
    assert np.array_equal(a.frames, b.frames)  # eagerly: the same numbers
    assert pipe.missing_compiled() == ["unet 6x8x32x48", "decoder 3x4x32x48"]
    built = []
    monkeypatch.setattr(
        compiled.CompiledNet, "build", lambda self, key, progress: not built.append((self.name, key[1]))
    )
    pipe.build_missing()
    assert built == [("unet", 3), ("decoder", 3)]
    built.clear()
    pipe.warmup(width=256, height=256, num_frames=2)
    assert [b for b in built if b[1] == 2] == [("unet", 2), ("decoder", 2)]


def test_extend_chains_segments_on_their_last_frames(tiny):
    img = np.random.RandomState(5).randint(0, 256, (256, 256, 3), dtype=np.uint8)
    kw = dict(width=256, height=256, num_frames=4, num_steps=2)
    steps = []
    v = tiny.generate(img, seed=11, extend=2, callback=lambda s, t, x: steps.append((s, t)), **kw)
    assert v.num_frames == 4 + 2 * 3 and v.params["total_frames"] == 10
    assert steps == [(s, 6) for s in range(1, 7)]  # progress counts the steps of every segment
    assert v.params["extend"] == 2 and v.params["segment_seeds"] == [11, 12, 13]
    first = tiny.generate(img, seed=11, **kw).frames
    np.testing.assert_array_equal(v.frames[:4], first)  # segment 0 is the plain video of the seed
    # Segment 1 is the video of seed 12 conditioned on segment 0's last frame, without its first frame.
    second = tiny.generate(first[-1], seed=12, **kw).frames
    np.testing.assert_array_equal(v.frames[4:7], second[1:])
    again = tiny.generate(img, seed=11, extend=2, **kw).frames
    np.testing.assert_array_equal(v.frames, again)  # same seed, same long video
    assert not np.array_equal(tiny.generate(img, seed=12, extend=2, **kw).frames, v.frames)


def test_segment_seeds_stay_in_the_seed_range():
    from img2vid.pipeline import segment_seeds

    assert segment_seeds(2**63 - 1, 2) == [2**63 - 1, 0, 1]


def test_pingpong_plays_forward_then_back(tiny):
    from img2vid.pipeline import pingpong

    frames = np.arange(5)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    assert [int(f[0, 0, 0]) for f in pingpong(frames)] == [0, 1, 2, 3, 4, 3, 2, 1]
    assert len(pingpong(frames[:2])) == 2 and len(pingpong(frames[:1])) == 1
    img = np.random.RandomState(6).randint(0, 256, (256, 256, 3), dtype=np.uint8)
    kw = dict(width=256, height=256, num_frames=4, num_steps=1, seed=3)
    plain = tiny.generate(img, **kw).frames
    looped = tiny.generate(img, loop="pingpong", **kw)
    assert looped.num_frames == 6 and looped.params["loop"] == "pingpong"
    np.testing.assert_array_equal(looped.frames, plain[[0, 1, 2, 3, 2, 1]])


def test_watermark_marks_every_frame(tiny):
    from img2vid import watermark

    img = np.random.RandomState(7).randint(0, 256, (256, 256, 3), dtype=np.uint8)
    kw = dict(width=256, height=256, num_frames=3, num_steps=1, seed=2)
    plain = tiny.generate(img, **kw)
    marked = tiny.generate(img, watermark=True, **kw)
    assert marked.params["watermark"] is True and plain.params["watermark"] is False
    assert [watermark.bit_accuracy(f) for f in marked.frames] == [1.0] * 3
    assert max(watermark.bit_accuracy(f) for f in plain.frames) < 1.0
    np.testing.assert_array_equal(marked.frames, watermark.embed(plain.frames))

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
    from img2vid import runtime

    for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    assert runtime.use_expandable_segments() is changed
    assert calls == (["expandable_segments:True"] if changed else [])


def test_channels_last_weights_change_nothing():
    """The GPU layout (NHWC/NDHWC weights and inputs) must give the same numbers; checked here on the CPU."""
    from img2vid import runtime

    a = img2vid.load("tiny", device="cpu")
    b = img2vid.load("tiny", device="cpu")
    runtime.use_channels_last(b.unet)
    runtime.use_channels_last(b.vae)
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


def test_compiling_block_by_block_traces_each_shape_once_without_graph_breaks():
    """The GPU default compiles the UNet block by block (runtime.compile_network, "regions") and the decoder as
    one graph. Checked on the CPU with Dynamo and a recording backend: every block traces into one graph
    (fullgraph: a graph break fails), blocks of the same class and shapes share a graph, and the numbers are
    eager mode's."""
    from img2vid import runtime

    pipe = img2vid.load("tiny", device="cpu")
    x = torch.randn(6, 8, 32, 32)
    args = (torch.zeros(6), torch.randn(6, 1, 32), torch.randn(6, 3), 3)
    z = torch.randn(3, 4, 32, 32)
    with torch.no_grad():
        eager = pipe.unet(x, *args), pipe.vae.decode(z, 3)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        assert runtime.compile_network(pipe.unet, "regions", backend=backend) is pipe.unet
        decoder = runtime.compile_network(pipe.vae.decoder, "whole", backend=backend)
        with torch.no_grad():
            unet = pipe.unet(x, *args)
            n_unet = len(graphs)
            compiled = unet, decoder(z / pipe.config.vae.scale_factor, 3)
            assert len(graphs) == n_unet + 1  # the whole decoder: one graph
            again = pipe.unet(x, *args), decoder(z / pipe.config.vae.scale_factor, 3)
        # e.g. the two transformers of a UNet level share a graph
        assert 0 < n_unet < len(pipe.unet.compile_regions())
        assert len(graphs) == n_unet + 1  # the second call traced nothing
        for a, b in zip(compiled + again, eager + eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        runtime.uncompile_network(pipe.unet)
        torch._dynamo.reset()
    assert not any("forward" in m.__dict__ or "head" in m.__dict__ for m in pipe.unet.modules())


def test_setup_switches_compiling_on_and_off(monkeypatch):
    from img2vid import runtime

    calls = []
    real = runtime.compile_network

    def record(net, scope):
        calls.append((type(net).__name__, scope))
        return real(net, scope, backend="eager")

    monkeypatch.setattr(runtime, "compile_network", record)
    pipe = img2vid.load("tiny", device="cpu")
    assert pipe.compiled is False  # the CPU default
    try:
        pipe.setup("fast", compile=True)
        assert pipe.compiled == "regions" and calls == [("UNet", "regions"), ("Decoder", "whole")]
        assert "head" in pipe.unet.__dict__ and "forward" in pipe.unet.output_blocks[0][0].__dict__
        pipe.setup("fast", compile=True)  # already compiled this way: nothing recompiled
        assert len(calls) == 2
        pipe.setup("fast", compile="whole")
        assert pipe.compiled == "whole" and "head" not in pipe.unet.__dict__
        assert calls[2:] == [("UNet", "whole"), ("Decoder", "whole")]
        assert pipe.unet_forward is not pipe.unet
        with pytest.raises(ValueError, match="'full'"):
            pipe.setup("low", compile="full")
        assert pipe.compiled == "whole" and pipe.memory == "fast"  # nothing changed
        pipe.setup("fast", compile=False)
        assert pipe.compiled is False and pipe.unet_forward is pipe.unet
        assert pipe.decoder_forward is pipe.vae.decoder
    finally:
        torch._dynamo.reset()


def test_inductor_heuristics_make_short_default_reductions_persistent(monkeypatch):
    """runtime's heuristic: a DEFAULT-hint reduction over at most 2048 elements (the UNet's layer norms fused
    with broadcast adds) is persistent; everything else is left to Inductor."""
    import sympy
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint

    from img2vid import runtime

    asked = []

    class Base(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction):
            asked.append(features.hint)
            return False

    class Features:
        def __init__(self, hint, numel):
            self.hint, self.reduction_numel = hint, sympy.Integer(numel)

        def get_reduction_hint(self):
            return self.hint

    decide = runtime.inductor_choices(Base, ReductionHint).should_use_persistent_reduction
    D, O = ReductionHint.DEFAULT, ReductionHint.OUTER
    assert decide(Features(D, 320), False) and decide(Features(D, 1280), False)
    assert asked == []  # decided without asking Inductor
    assert not decide(Features(D, 2560), False)  # longer rows: Inductor's choice (here, no)
    assert not decide(Features(O, 320), False)  # other hints: Inductor's choice
    assert not decide(Features(D, 320), True)  # cooperative reductions: Inductor's choice
    assert asked == [D, O, D]
    monkeypatch.setattr(torch._inductor.config.triton, "persistent_reductions", False)
    assert not decide(Features(D, 320), False)  # Inductor's switch is respected


def test_compiled_pipeline_installs_the_heuristics_in_the_generating_thread(monkeypatch):
    """Inductor's heuristics are per thread and compiling happens in the thread that first runs the network (a
    server's worker thread), so generate installs them there."""
    import threading

    from torch._inductor.virtualized import V

    from img2vid import runtime

    real = runtime.compile_network
    monkeypatch.setattr(runtime, "compile_network", lambda net, scope: real(net, scope, backend="eager"))
    pipe = img2vid.load("tiny", device="cpu").setup("fast", compile=True)
    seen = {}

    def work():
        seen["before"] = type(V.choices).__name__
        pipe.generate(np.full((256, 256, 3), 128, np.uint8), width=256, height=256, num_frames=2, num_steps=1)
        seen["after"] = type(V.choices).__name__

    try:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    finally:
        pipe.setup("fast", compile=False)
        torch._dynamo.reset()
    assert seen == {"before": "InductorChoices", "after": "Choices"}

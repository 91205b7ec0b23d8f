"""Frame interpolation: RIFE's flownet at random weights loads strictly by the published key names, keeps the
generated frames bit for bit, multiplies frames and fps, and fails clearly (and before any step) offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import img2vid
from img2vid import interpolate
from img2vid.errors import CheckpointError, ParameterError
from img2vid.models.rife import IFNet


def flownet_keys() -> dict[str, tuple[int, ...]]:
    """The keys and shapes of a Practical-RIFE v4.13 flownet, written out from its layout (not from IFNet)."""
    keys = {
        "encode.cnn0.weight": (32, 3, 3, 3),
        "encode.cnn1.weight": (32, 32, 3, 3),
        "encode.cnn2.weight": (32, 32, 3, 3),
        "encode.cnn3.weight": (32, 8, 4, 4),  # ConvTranspose2d: (in, out, k, k)
        **{f"encode.cnn{i}.bias": (32,) for i in range(3)},
        "encode.cnn3.bias": (8,),
    }
    for b, (cin, c) in enumerate([(23, 192), (28, 128), (28, 96), (28, 64)]):
        p = f"block{b}."
        keys |= {p + "conv0.0.0.weight": (c // 2, cin, 3, 3), p + "conv0.0.0.bias": (c // 2,)}
        keys |= {p + "conv0.1.0.weight": (c, c // 2, 3, 3), p + "conv0.1.0.bias": (c,)}
        for i in range(8):
            q = f"{p}convblock.{i}."
            keys |= {q + "conv.weight": (c, c, 3, 3), q + "conv.bias": (c,), q + "beta": (1, c, 1, 1)}
        keys |= {p + "lastconv.0.weight": (c, 24, 4, 4), p + "lastconv.0.bias": (24,)}
    return keys


def write_flownet(path, prefix="", drop=(), extra=()):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        prefix + k: torch.randn(s, generator=gen) * 0.05 for k, s in flownet_keys().items() if k not in drop
    }
    tensors |= {prefix + k: torch.zeros(1) for k in extra}
    save_file(tensors, str(path))
    return tensors


@pytest.fixture(scope="module")
def tiny():
    return img2vid.load("tiny", device="cpu")


def test_the_network_has_the_flownet_layout():
    net = IFNet()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == flownet_keys()


@pytest.mark.parametrize("prefix", ["", "module."])
def test_a_flownet_file_loads_strictly(tmp_path, prefix):
    tensors = write_flownet(tmp_path / "flownet.safetensors", prefix)
    net = interpolate.load_interpolator(tmp_path / "flownet.safetensors")
    state = net.state_dict()
    assert all(torch.equal(state[k], tensors[prefix + k]) for k in flownet_keys())


def test_a_mismatched_file_names_its_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    write_flownet(path, drop=("block3.lastconv.0.bias",), extra=("block4.conv0.0.0.weight",))
    with pytest.raises(CheckpointError) as e:
        interpolate.load_interpolator(path)
    assert "missing 1 key(s): block3.lastconv.0.bias" in str(e.value)
    assert "unexpected 1 key(s): block4.conv0.0.0.weight" in str(e.value)


def test_offline_hub_weights_fail_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="hf download someone/rife-weights flownet.safetensors"):
        interpolate.load_interpolator("someone/rife-weights/flownet.safetensors")
    with pytest.raises(CheckpointError, match="not a hub id"):
        interpolate.load_interpolator("no-such-file.safetensors")


def test_weights_source_order(monkeypatch):
    monkeypatch.delenv(interpolate.ENV, raising=False)
    assert interpolate.weights_source() == "imaginairy/rife-interpolation/rife-flownet-4.13.2.safetensors"
    monkeypatch.setenv(interpolate.ENV, "/models/rife.safetensors")
    assert interpolate.weights_source() == "/models/rife.safetensors"
    assert interpolate.weights_source("a/b") == "a/b"


def test_constant_frames_stay_constant():
    # Warping a flat image gives the same flat image whatever the flow, and the blend of two equal images is
    # that image: a check of the warp and blend that holds at any weights.
    net = interpolate.load_interpolator("random")
    frames = torch.full((3, 3, 64, 96), 0.25)
    new = interpolate.in_between(net, frames, 4)
    assert new.shape == (2 * 3, 3, 64, 96)
    torch.testing.assert_close(new, torch.full_like(new, 0.25))


def test_interleave_keeps_the_originals_in_place():
    originals = np.arange(3)[:, None] * 10  # frames 0, 10, 20
    new = np.array([[1], [2], [3], [11], [12], [13]])  # pair 0: t = 1/4, 2/4, 3/4; then pair 1
    assert interpolate.interleave(originals, new)[:, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 20]


@pytest.mark.parametrize("factor", [2, 4])
def test_generate_interpolates(tiny, factor):
    kw = dict(width=256, height=256, num_frames=3, num_steps=2, seed=5)
    image = np.full((256, 256, 3), 90, np.uint8)
    plain = tiny.generate(image, **kw)
    video = tiny.generate(image, interpolate=factor, **kw)
    assert video.num_frames == (3 - 1) * factor + 1
    assert np.array_equal(video.frames[::factor], plain.frames)  # the generated frames, bit for bit
    assert video.fps == plain.fps * factor and video.params["fps"] == plain.fps * factor
    p = video.params
    assert p["interpolate"] == factor and p["frames_generated"] == 3 and "interpolating" in p["timings"]


def test_bad_factor_is_refused_by_name(tiny):
    steps = []
    with pytest.raises(ParameterError, match="interpolate: must be one of 1, 2, 4, got 3") as e:
        tiny.generate(np.zeros((256, 256, 3), np.uint8), interpolate=3, callback=steps.append)
    assert e.value.field == "interpolate" and steps == []


def test_missing_weights_fail_before_any_step(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tiny, "interpolation_weights", "someone/rife-weights")
    steps = []
    with pytest.raises(CheckpointError, match="not in the local huggingface_hub cache"):
        tiny.generate(np.zeros((256, 256, 3), np.uint8), interpolate=2, callback=steps.append)
    assert steps == []


def test_extend_interpolate_watermark_and_loop_together(tiny):
    from img2vid import watermark

    kw = dict(width=256, height=256, num_frames=3, num_steps=2, seed=5)
    image = np.random.RandomState(8).randint(0, 256, (256, 256, 3), dtype=np.uint8)
    long = tiny.generate(image, extend=1, **kw)  # 3 + 2 generated frames
    seen = []
    video = tiny.generate(
        image, extend=1, interpolate=2, watermark=True, loop="pingpong", callback=seen.append, **kw
    )
    # The two segments are interpolated as one video, then every frame is marked, then played back and forth.
    forward = video.frames[: (5 - 1) * 2 + 1]
    assert video.num_frames == 2 * len(forward) - 2 and video.params["total_frames"] == video.num_frames
    np.testing.assert_array_equal(forward[::2], watermark.embed(long.frames))
    assert [watermark.bit_accuracy(f) for f in forward[1::2]] == [1.0] * 4  # the new frames carry it too
    p = video.params
    assert p["frames_generated"] == 5 and p["segment_seeds"] == [5, 6] and p["fps"] == long.fps * 2
    assert [x.phase for x in seen if x.phase != "sampling"] == [
        "loading", "conditioning", "decoding", "conditioning", "decoding", "interpolating",
    ]  # fmt: skip
    assert [x.step for x in seen if x.latents is not None] == [1, 2, 3, 4] and seen[-1].total == 4

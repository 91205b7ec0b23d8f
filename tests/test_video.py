"""img2vid.video: each format reads back (with PyAV, or Pillow for animated WebP) with the right frames, size,
rate and metadata; outputs are never overwritten by accident and no temporary files are left behind."""

import contextlib
import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from img2vid import video as video_mod
from img2vid.errors import Img2VidError
from img2vid.video import OutputExistsError, Video, codecs_available, read_metadata, write_video

T, H, W = 9, 64, 128
META = {"seed": 42, "prompt": 'café "quoted"', "motion_bucket_id": 127, "sizes": [1024, 576], "x": None}


def gradient(t=T, h=H, w=W):
    """Smooth frames that move: compress well and decode close to the input."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [
            np.stack([(x * 2 + i * 8) % 256, y * 255 // h, np.full_like(x, i * 255 // max(1, t - 1))], -1)
            for i in range(t)
        ]
    ).astype(np.uint8)


def read_av(path):
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
        return frames, stream.average_rate


def read_pillow(path):
    frames, durations = [], []
    with Image.open(path) as im:
        for i in range(im.n_frames):
            im.seek(i)
            im.load()
            frames.append(np.asarray(im.convert("RGB")))
            durations.append(im.info["duration"])
    return np.stack(frames), durations


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_mp4_webm_exact_rate(tmp_path, suffix):
    frames = gradient()
    path = write_video(tmp_path / f"v{suffix}", frames, 7, META)
    assert path == tmp_path / f"v{suffix}" and listing(tmp_path) == [f"v{suffix}"]
    out, rate = read_av(path)
    assert out.shape == (T, H, W, 3) and rate == 7
    assert np.abs(out.astype(int) - frames).mean() < 4  # good quality, right colours (BT.709 both ways)
    assert read_metadata(path) == META
    with av.open(str(path)) as c:
        assert {k.lower() for k in c.metadata} >= {"comment"}
        assert json.loads(next(v for k, v in c.metadata.items() if k.lower() == "comment")) == META
        cc = c.streams.video[0].codec_context
        assert cc.name == ("h264" if suffix == ".mp4" else "vp9") and cc.pix_fmt == "yuv420p"


@pytest.mark.parametrize("fps", [6, 25, 29.97, Fraction(30000, 1001), 8.5])
def test_mp4_rates(tmp_path, fps):
    _, rate = read_av(write_video(tmp_path / "v.mp4", gradient(t=4), fps))
    assert rate == Fraction(fps).limit_denominator(1001)


def test_gif(tmp_path):
    frames = gradient()
    path = write_video(tmp_path / "v.gif", frames, 7, META)
    out, rate = read_av(path)
    assert out.shape == (T, H, W, 3)
    assert float(rate) == pytest.approx(7, rel=0.03)  # 14 cs per frame reads as 7.14 fps
    assert np.abs(out.astype(int) - frames).mean() < 16  # 256 colours, dithered
    assert read_metadata(path) == META
    with Image.open(path) as im:
        assert json.loads(im.info["comment"]) == META and im.info["loop"] == 0
        delays = []
        for i in range(im.n_frames):
            im.seek(i)
            delays.append(im.info["duration"])
    assert set(delays) <= {140, 150} and abs(sum(delays) - T * 1000 / 7) <= 10  # total duration stays right


def test_webp(tmp_path):
    # PyAV (FFmpeg's webp decoder) cannot decode animated WebP, so it is checked with Pillow.
    frames = gradient()
    path = write_video(tmp_path / "v.webp", frames, 7, META)
    out, durations = read_pillow(path)
    assert out.shape == (T, H, W, 3)
    assert set(durations) <= {142, 143} and sum(durations) == round(T * 1000 / 7)
    assert np.abs(out.astype(int) - frames).mean() < 6
    assert read_metadata(path) == META
    with contextlib.suppress(av.error.InvalidDataError):  # FFmpeg's webp decoder: still images only (so far)
        assert len(read_av(path)[0]) == T


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif", ".webp"])
def test_identical_frames_are_kept(tmp_path, suffix):
    # libwebp's animation encoder and Pillow's GIF writer would merge these into one frame.
    frames = np.repeat(gradient(t=1), 5, axis=0)
    path = write_video(tmp_path / f"v{suffix}", frames, 7)
    out = read_pillow(path)[0] if suffix == ".webp" else read_av(path)[0]
    assert len(out) == 5
    assert read_metadata(path) == {}


def test_png_folder(tmp_path):
    frames = gradient()
    path = write_video(str(tmp_path / "frames") + os.sep, frames, 7, META)  # trailing separator: a folder
    assert path == tmp_path / "frames" and listing(tmp_path) == ["frames"]
    assert listing(path) == [f"frame_{i:04d}.png" for i in range(T)] + ["params.json"]
    for i in (0, T - 1):
        assert np.array_equal(np.asarray(Image.open(path / f"frame_{i:04d}.png")), frames[i])  # lossless
    assert json.loads((path / "params.json").read_text()) == META == read_metadata(path)
    assert write_video(tmp_path / "no_suffix", frames[:2], 7).is_dir()


def test_video_dataclass(tmp_path):
    v = Video(frames=gradient(), fps=7.0, params=META)
    assert (v.num_frames, v.width, v.height) == (T, W, H)
    path = v.save(tmp_path / "v.mp4")
    assert read_metadata(path) == META and read_av(path)[1] == 7
    assert read_av(v.save(tmp_path / "v.mp4", overwrite=True, fps=12))[1] == 12


@pytest.mark.parametrize("name", ["v.mp4", "v.gif", "v.webp", "frames"])
def test_refuses_to_overwrite(tmp_path, name):
    path = tmp_path / name
    write_video(path, gradient(t=2), 7, {"n": 1})
    with pytest.raises(OutputExistsError, match="already exists: use --overwrite") as e:
        write_video(path, gradient(t=3), 7, {"n": 2})
    assert isinstance(e.value, FileExistsError) and isinstance(e.value, Img2VidError)
    assert read_metadata(path) == {"n": 1}
    write_video(path, gradient(t=3), 7, {"n": 2}, overwrite=True)
    assert read_metadata(path) == {"n": 2} and listing(tmp_path) == [name]
    if name == "frames":  # frames of the old, longer video must not linger
        assert listing(path) == ["frame_0000.png", "frame_0001.png", "frame_0002.png", "params.json"]


def test_overwrite_never_wipes_a_foreign_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(Img2VidError, match="holding other files"):
        write_video(folder, gradient(t=2), 7, overwrite=True)
    (tmp_path / "x.mp4").mkdir()
    with pytest.raises(Img2VidError, match="is a folder: cannot replace it with a .mp4 file"):
        write_video(tmp_path / "x.mp4", gradient(t=2), 7, overwrite=True)
    assert (folder / "holiday.jpg").read_bytes() == b"precious"
    assert listing(tmp_path) == ["photos", "x.mp4"]


@pytest.mark.parametrize("name", ["v.mp4", "v.gif", "v.webp", "frames"])
def test_no_temp_files_left_after_failure(tmp_path, monkeypatch, name):
    # The output appears while we encode: the finished temporary must be removed, the newcomer kept.
    real_check = video_mod._check_target
    calls = []

    def check_target(path, kind, overwrite):
        calls.append(path)
        if len(calls) == 2:
            assert len(listing(tmp_path)) == 1  # the temporary, fully written
            path.write_text("someone else's")
        real_check(path, kind, overwrite)

    monkeypatch.setattr(video_mod, "_check_target", check_target)
    with pytest.raises(OutputExistsError):
        write_video(tmp_path / name, gradient(t=3), 7, META)
    assert listing(tmp_path) == [name] and (tmp_path / name).read_text() == "someone else's"


@pytest.mark.parametrize("name", ["v.webp", "frames"])
def test_no_temp_files_left_after_interrupt(tmp_path, monkeypatch, name):
    real_save, saved = Image.Image.save, []

    def save(self, *args, **kwargs):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(1)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(KeyboardInterrupt):
        write_video(tmp_path / name, gradient(t=5), 7)
    assert listing(tmp_path) == []


def test_file_and_folder_replace_each_other(tmp_path):
    (tmp_path / "frames").write_text("a file without suffix")
    write_video(tmp_path / "frames", gradient(t=2), 7, overwrite=True)
    assert listing(tmp_path / "frames") == ["frame_0000.png", "frame_0001.png", "params.json"]
    write_video(tmp_path / "v.gif", gradient(t=2), 7)
    write_video(tmp_path / "v.gif", gradient(t=2), 7, overwrite=True)
    assert listing(tmp_path) == ["frames", "v.gif"]


def test_creates_parent_folders(tmp_path):
    path = write_video(tmp_path / "a" / "b" / "v.gif", gradient(t=2), 7)
    assert path.is_file() and listing(path.parent) == ["v.gif"]


def test_bad_inputs(tmp_path):
    frames = gradient(t=2)
    with pytest.raises(
        Img2VidError, match=r"unknown video format '\.avi'; supported: \.mp4, \.webm, \.gif, \.webp"
    ):
        write_video(tmp_path / "v.avi", frames, 7)
    for bad in [frames.astype(np.float32), frames[0], frames[..., :2], np.zeros((0, 64, 64, 3), np.uint8)]:
        with pytest.raises(Img2VidError, match=r"frames must be a uint8 array of shape \(T, H, W, 3\)"):
            write_video(tmp_path / "v.mp4", bad, 7)
    for fps in [0, -1, float("nan"), float("inf"), "7", None]:
        with pytest.raises(Img2VidError, match="fps must be a positive number"):
            write_video(tmp_path / "v.mp4", frames, fps)
    odd = np.zeros((2, 63, 128, 3), np.uint8)
    with pytest.raises(Img2VidError, match="needs an even width and height, got 128x63"):
        write_video(tmp_path / "v.mp4", odd, 7)
    assert (
        len(read_pillow(write_video(tmp_path / "odd.webp", odd, 7))[0]) == 2
    )  # fine where no chroma subsampling
    assert listing(tmp_path) == ["odd.webp"]
    with pytest.raises(Img2VidError, match="no such file"):
        read_metadata(tmp_path / "missing.mp4")


def test_missing_codec_is_explained(tmp_path, monkeypatch):
    monkeypatch.setitem(video_mod._ENCODERS, ".mp4", "no-such-encoder")
    with pytest.raises(Img2VidError, match=r"no no-such-encoder encoder \(needed for \.mp4\): write \.webm"):
        write_video(tmp_path / "v.mp4", gradient(t=2), 7)
    assert codecs_available()["h264 (mp4)"] is False
    assert listing(tmp_path) == []


def test_codecs_available():
    assert codecs_available() == {"h264 (mp4)": True, "vp9 (webm)": True, "gif": True, "webp": True}


def test_metadata_absent_or_foreign(tmp_path):
    plain = tmp_path / "plain.gif"
    Image.new("RGB", (8, 8)).save(plain, comment=b"not json")
    assert read_metadata(plain) == {}
    still = tmp_path / "still.webp"
    Image.new("RGB", (8, 8)).save(still)
    assert read_metadata(still) == {}


# -- issue 19: refused up front, never a device, no temporary left -----------------------------------------


@pytest.mark.parametrize("fps", [0.0001, 0.009, 1000.5, 1e308])
def test_fps_outside_the_range_every_format_stores_is_refused(tmp_path, fps):
    for name in ["v.mp4", "v.gif", "v.webp", "frames"]:
        with pytest.raises(Img2VidError, match=r"fps must be between 0\.01 and 1000, got"):
            write_video(tmp_path / name, gradient(t=2), fps)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("fps", [0.01, 1000])
def test_fps_at_the_ends_of_the_range_is_written(tmp_path, fps):
    for name in ["v.mp4", "v.webm", "v.gif", "v.webp", "frames"]:
        write_video(tmp_path / name, gradient(t=2), fps)
    assert read_av(tmp_path / "v.mp4")[1] == Fraction(fps).limit_denominator(1001)


def test_a_long_legal_name_is_written_the_temporary_name_is_cut_to_fit(tmp_path):
    name = "v" * 251 + ".mp4"  # 255 bytes: the most a file name may have
    video_mod.check_output(tmp_path / name)
    write_video(tmp_path / name, gradient(t=2), 7)
    assert listing(tmp_path) == [name]
    with pytest.raises(Img2VidError, match="is 256 bytes long; file names can have at most 255"):
        video_mod.check_output(tmp_path / ("v" + name))


def test_overwrite_never_replaces_a_device_or_a_link(tmp_path):
    with pytest.raises(Img2VidError, match="/dev/full is a device, pipe or socket, not a regular file"):
        video_mod.check_output("/dev/full", overwrite=True)
    os.mkfifo(tmp_path / "pipe")  # a stand-in for a device node: writing the test's way cannot harm /dev
    for name in ["pipe", "pipe.mp4"]:
        os.replace(tmp_path / listing(tmp_path)[0], tmp_path / name)
        with pytest.raises(Img2VidError, match="pipe(.mp4)? is a device, pipe or socket, not a regular file"):
            write_video(tmp_path / name, gradient(t=2), 7, overwrite=True)
        assert listing(tmp_path) == [name] and not (tmp_path / name).is_file()
    os.unlink(tmp_path / "pipe.mp4")
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    (tmp_path / "v.mp4").symlink_to(target)
    with pytest.raises(Img2VidError, match="is a symbolic link, not a regular file"):
        write_video(tmp_path / "v.mp4", gradient(t=2), 7, overwrite=True)
    assert (tmp_path / "v.mp4").is_symlink() and listing(tmp_path) == ["precious.txt", "v.mp4"]


def test_check_output_finds_an_unwritable_folder_before_any_work(tmp_path, monkeypatch):
    import errno

    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT and str(path).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    video_mod.check_output(tmp_path / "new" / "deeper" / "v.mp4")  # missing folders are made later
    assert listing(tmp_path) == []
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(
        Img2VidError, match=rf"cannot write {tmp_path}/v\.mp4: Permission denied \({tmp_path}\)"
    ):
        video_mod.check_output(tmp_path / "v.mp4")
    with pytest.raises(Img2VidError, match="cannot write .*/new/v.mp4: Permission denied"):
        video_mod.check_output(tmp_path / "new" / "v.mp4")
    (tmp_path / "file").write_text("")
    with pytest.raises(Img2VidError, match="file is not a folder"):
        video_mod.check_output(tmp_path / "file" / "v.mp4")

"""The img2vid command line, end to end on the tiny model (random weights): outputs in every format read back
with the frames, size and frame rate asked for; bad values and existing outputs fail in one line, before the
model loads; folder runs go on past bad files; exit codes follow the documented rules."""

from __future__ import annotations

import io
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import img2vid
from img2vid import cli, memory
from img2vid.config import PRESETS

FAST = ["--model", "tiny", "--size", "256x256", "--frames", "3", "--steps", "2"]


def make_image(path: Path, seed: int = 0, size=(400, 300)) -> Path:
    w, h = size
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def image(tmp_path) -> Path:
    return make_image(tmp_path / "photo.png")


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the model is loaded (for errors that must come before loading)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(img2vid, "load", refuse)


def read_av(path: Path):
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        return frames, stream.average_rate


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("img2vid: error: ")
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------------------------
# Formats


def test_console_script_mp4(tmp_path, image):
    """The installed `img2vid` script: --fps-id 9 plays at 10 fps."""
    script = shutil.which("img2vid") or str(Path(sys.executable).with_name("img2vid"))
    assert Path(script).is_file(), "the img2vid console script is not installed (pip install -e .)"
    out = tmp_path / "out.mp4"
    proc = subprocess.run(
        [script, "generate", str(image), *FAST, "--fps-id", "9", "--seed", "3", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    frames, rate = read_av(out)
    assert len(frames) == 3 and frames[0].shape == (256, 256, 3)
    assert rate == 10
    assert f"wrote {out}: 3 frames, 256x256, 10 fps, seed 3" in proc.stdout
    assert "loaded tiny (random weights) on cpu, float32, memory mode fast" in proc.stderr
    assert "step 2/2 (100%)" in proc.stderr


def test_webm_fps_overrides_playback(tmp_path, image, capsys):
    out = tmp_path / "clip.webm"
    assert cli.main(["generate", str(image), *FAST, "--fps-id", "9", "--fps", "12", "-o", str(out)]) == 0
    frames, rate = read_av(out)
    assert len(frames) == 3 and frames[0].shape == (256, 256, 3)
    assert rate == 12
    assert img2vid.video.read_metadata(out)["fps_id"] == 9  # the conditioning is unchanged
    assert "12 fps" in capsys.readouterr().out


def test_gif(tmp_path, image):
    out = tmp_path / "clip.gif"
    assert cli.main(["generate", str(image), *FAST, "--fps-id", "4", "-o", str(out), "--quiet"]) == 0
    frames, rate = read_av(out)
    assert len(frames) == 3 and frames[0].shape == (256, 256, 3)
    assert abs(float(rate) - 5) < 0.5  # GIF delays are whole centiseconds


def test_webp(tmp_path, image):
    out = tmp_path / "clip.webp"
    assert cli.main(["generate", str(image), *FAST, "-o", str(out), "--quiet"]) == 0
    with Image.open(out) as im:  # PyAV cannot read animated WebP
        assert im.n_frames == 3 and im.size == (256, 256)
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()  # the frame's duration is known once it is loaded
            durations.append(im.info["duration"])
    assert sum(durations) == round(3 * 1000 / 7)  # default --fps-id 6: 7 fps


def test_png_folder_and_quiet(tmp_path, image, capsys):
    out = tmp_path / "frames"
    assert cli.main(["generate", str(image), *FAST, "--size", "320x256", "-o", str(out), "--quiet"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    with Image.open(pngs[0]) as im:
        assert im.size == (320, 256)
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress, no loading message
    assert captured.out.startswith(f"wrote {out}: 3 frames, 320x256, 7 fps")


# --------------------------------------------------------------------------------------------------------------
# Folders, seeds, existing outputs


def test_folder_goes_on_past_a_bad_file(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    make_image(src / "b.jpg", 1)
    make_image(src / "a.PNG", 2, size=(300, 400))
    (src / "bad.png").write_text("this is text, not a picture")
    (src / "notes.txt").write_text("ignored")
    (src / ".hidden.png").write_text("ignored")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "in", *FAST, "--seed", "5"]) == 2  # -o defaults to the current folder
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["a.mp4", "b.mp4"]
    captured = capsys.readouterr()
    out_lines = captured.out.splitlines()
    assert [line.split(":")[0] for line in out_lines] == ["wrote a.mp4", "wrote b.mp4"]  # sorted by name
    assert "[1/2] a.PNG" in captured.err
    assert "made 2 video(s); 1 failed:" in captured.err
    assert "bad.png: not an image" in captured.err.split("failed:")[1]
    assert "notes.txt" not in captured.err and ".hidden" not in captured.err
    assert "Traceback" not in captured.err


def test_seeds_make_different_videos(tmp_path, image, capsys):
    out = tmp_path / "out"
    assert (
        cli.main(["generate", str(image), *FAST, "--seeds", "1,2", "-o", f"{out}/", "--format", "mp4"]) == 0
    )
    one, two = out / "photo_seed1.mp4", out / "photo_seed2.mp4"
    assert sorted(out.iterdir()) == [one, two]
    f1, _ = read_av(one)
    f2, _ = read_av(two)
    assert len(f1) == len(f2) == 3
    assert not np.array_equal(np.stack(f1), np.stack(f2))
    stdout = capsys.readouterr().out
    assert "seed 1," in stdout and "seed 2," in stdout


def test_existing_output_is_kept(tmp_path, image, capsys, no_load):
    out = tmp_path / "photo.mp4"
    out.write_bytes(b"precious")
    assert cli.main(["generate", str(image), *FAST, "-o", str(out)]) == 2
    assert out.read_bytes() == b"precious"
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "--overwrite" in line


def test_existing_outputs_in_a_folder_run_are_skipped(tmp_path, image, capsys, no_load):
    (tmp_path / "photo_seed1.gif").write_bytes(b"x")
    (tmp_path / "photo_seed2.gif").write_bytes(b"y")
    args = ["generate", str(image), *FAST, "--seeds", "1,2", "-o", str(tmp_path), "--format", "gif"]
    assert cli.main(args) == 2  # nothing left to make: the model is not even loaded
    err = capsys.readouterr().err
    assert "made 0 video(s); 2 failed" in err and err.count("already exists") == 4  # as found, then listed


# --------------------------------------------------------------------------------------------------------------
# Usage errors: one line, exit 2, before loading


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--frames", "0"], "--frames: must be between 1 and 128, got 0"),
        (["--steps", "many"], "--steps: must be an integer"),
        (["--motion", "2000"], "--motion: must be between 0 and 1023"),
        (["--cond-aug", "nan"], "--cond-aug: must be finite"),
        (["--max-cfg", "31"], "--max-cfg: must be between"),
        (["--decode-chunk", "0"], "--decode-chunk:"),
        (["--sampler", "ddim"], "--sampler: must be one of euler, heun, dpmpp_2m"),
        (["--guidance", "cosine"], "--guidance: must be one of linear, triangle, constant"),
        (["--fit", "stretch"], "--fit: must be one of crop, pad"),
        (["--size", "300x256"], "nearest: 320x256 or 256x256"),
        (["--size", "1024"], "--size: expected WIDTHxHEIGHT"),
        (["--size", "4096x576"], "--size: 4096x576 is not a valid size"),
        (["--seed", "-1"], "--seed: must be between 0"),
        (["--seeds", "1,,2"], "--seeds: expected comma-separated integers"),
        (["--seeds", "3,3"], "--seeds: 3 is given twice"),
        (["--fps", "0"], "--fps: must be a positive number"),
        (["--fps", "0.0001"], "--fps: must be between 0.01 and 1000, got '0.0001'"),
        (["--fps", "1e308"], "--fps: must be between 0.01 and 1000, got '1e308'"),
        (["--device", "meta"], "--device meta: img2vid runs on cpu, cuda or mps"),
        (["-o", "v" * 252 + ".mp4"], "is 256 bytes long; file names can have at most 255"),
        (["--overwrite", "-o", "/dev/full"], "/dev/full is a device, pipe or socket, not a regular file"),
        (["--dtype", "fp8"], "--dtype: must be one of fp16, bf16, fp32"),
        (["--memory", "huge"], "--memory: must be one of auto, fast, low"),
        (["--format", "avi"], "--format: must be one of mp4, webm, gif, webp, png"),
        (["-o", "clip.avi"], "unknown video format '.avi'"),
        (["-o", "clip.gif", "--format", "mp4"], "-o clip.gif is a gif output but --format says mp4"),
        (["--seeds", "1,2", "-o", "clip.mp4"], "-o names a folder"),
        (["--interpolate", "3"], "--interpolate: must be one of 1, 2, 4, got 3"),
        (["--preview", "live.jpg"], "--preview live.jpg: the name must end in .webp, .gif, .png"),
        (["--preview", "nowhere/live.gif"], "the folder nowhere does not exist"),
        (["--extend", "17"], "--extend: must be between 0 and 16, got 17"),
        (["--extend", "two"], "--extend: must be an integer"),
        (["--loop", "bounce"], "--loop: must be one of none, pingpong"),
        (["--sign", "nope.pem", "nope.key"], "--sign: cannot read the signing certificate nope.pem"),
        (["--sign", "a.pem", "b.key", "-o", "clip.webm"], "--sign: C2PA cannot sign .webm files"),
    ],
)
def test_bad_values_fail_before_loading(tmp_path, image, capsys, no_load, monkeypatch, flags, expect):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", str(image), *FAST, *flags]) == 2
    assert expect in one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.glob("*.mp4"))


def test_size_error_names_nearest_sizes(image, capsys, no_load):
    assert cli.main(["generate", str(image), "--model", "tiny", "--size", "300x256"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("img2vid: error: --size: 300x256 is not a valid size")
    assert "320x256" in line and "256x256" in line


def test_missing_input_and_empty_folder(tmp_path, capsys, no_load):
    assert cli.main(["generate", str(tmp_path / "nope.jpg"), *FAST]) == 2
    assert "nope.jpg: no such file or folder" in one_error_line(capsys.readouterr().err)
    (tmp_path / "readme.txt").write_text("no images here")
    assert cli.main(["generate", str(tmp_path), *FAST]) == 2
    assert "no images in this folder" in one_error_line(capsys.readouterr().err)


def test_bad_image_fails_before_loading(tmp_path, capsys, no_load):
    bad = tmp_path / "bad.png"
    bad.write_text("text")
    assert cli.main(["generate", str(bad), *FAST]) == 2
    assert "bad.png: not an image" in one_error_line(capsys.readouterr().err)


def test_unknown_model_is_a_usage_error(image, tmp_path, capsys):
    assert (
        cli.main(["generate", str(image), *FAST, "--model", "no-such-model", "-o", str(tmp_path / "x.mp4")])
        == 2
    )
    assert "'no-such-model' is not a preset" in one_error_line(capsys.readouterr().err)


def test_cuda_device_without_cuda(image, tmp_path, capsys, no_load):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["generate", str(image), *FAST, "--device", "cuda", "-o", str(tmp_path / "x.mp4")]) == 2
    assert "--device cuda: CUDA is not available" in one_error_line(capsys.readouterr().err)


def test_argparse_usage_errors_exit_2(capsys):
    assert cli.main(["generate"]) == 2
    assert cli.main(["generate", "x.png", "--seed", "1", "--seeds", "2,3"]) == 2
    assert cli.main(["no-such-command"]) == 2
    assert cli.main([]) == 2
    assert "usage:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Run-time failures, Ctrl-C, --debug


def _failing_generate(exc):
    def generate(self, *args, **kwargs):
        raise exc

    return generate


def test_runtime_error_exit_1_with_hint(tmp_path, image, capsys, monkeypatch):
    import torch

    oom = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail on a second line"
    )
    monkeypatch.setattr(img2vid.Pipeline, "generate", _failing_generate(oom))
    assert cli.main(["generate", str(image), *FAST, "-o", str(tmp_path / "x.mp4"), "--quiet"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "img2vid: error: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
        "img2vid: hint: try --memory low, or a smaller --decode-chunk (e.g. 4), --frames or --size",
    ]


def test_runtime_error_in_folder_run_stops(tmp_path, capsys, monkeypatch):
    for name in ("a.png", "b.png"):
        make_image(tmp_path / name)
    monkeypatch.setattr(img2vid.Pipeline, "generate", _failing_generate(RuntimeError("device lost")))
    assert cli.main(["generate", str(tmp_path), *FAST, "-o", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "img2vid: error: a.png: RuntimeError: device lost" in err
    assert "--debug" in err and "1 video(s) not made" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, image, monkeypatch):
    monkeypatch.setattr(img2vid.Pipeline, "generate", _failing_generate(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["generate", str(image), *FAST, "-o", str(tmp_path / "x.mp4"), "--debug", "--quiet"])


def test_ctrl_c_exits_130(tmp_path, image, capsys, monkeypatch):
    monkeypatch.setattr(img2vid.Pipeline, "generate", _failing_generate(KeyboardInterrupt()))
    assert cli.main(["generate", str(image), *FAST, "-o", str(tmp_path / "x.mp4"), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


# --------------------------------------------------------------------------------------------------------------
# Output naming and progress (no generation)


def _plan(argv):
    args = cli.build_parser().parse_args(["generate", *argv])
    fmt = cli._choice("--format", args.format, cli.OUTPUT_FORMATS)
    return cli.plan(args, cli.parse_seeds(args), fmt)


def test_output_naming(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "cat.jpg")
    assert [j.output for j in _plan(["cat.jpg"])[0]] == [Path("cat.mp4")]
    assert _plan(["cat.jpg", "--format", "png"])[0][0].output == Path("cat")
    assert _plan(["cat.jpg", "-o", "v/"])[0][0].output == Path("v/cat.mp4")
    assert _plan(["cat.jpg", "-o", "v/", "--format", "gif"])[0][0].output == Path("v/cat.gif")
    assert _plan(["cat.jpg", "-o", "clip.WEBM"])[1] == "webm"
    (tmp_path / "existing").mkdir()
    assert _plan(["cat.jpg", "-o", "existing"])[0][0].output == Path("existing/cat.mp4")
    jobs, fmt = _plan(["cat.jpg", "--seeds", "7,8", "--format", "webp"])
    assert [j.output for j in jobs] == [Path("cat_seed7.webp"), Path("cat_seed8.webp")] and fmt == "webp"
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("x.png", "x.jpg", "y.TIFF", "z.bmp", ".h.png", "w.txt"):
        make_image(folder / name) if name != "w.txt" else (folder / name).write_text("")
    jobs, _ = _plan(["imgs", "-o", "out"])
    assert [str(j.output) for j in jobs] == ["out/x_jpg.mp4", "out/x_png.mp4", "out/y.mp4", "out/z.mp4"]


def test_progress_lines():
    from img2vid.progress import Progress as Report

    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    plain = Stream(False)
    p = cli.Progress("a.png", 30, plain)
    p(Report("conditioning", 0, 30))
    for step in range(1, 31):
        p(Report("sampling", step, 30, eta_s=30.0 - step))
    p(Report("decoding", 30, 30))
    p.set_phase("writing")
    lines = plain.getvalue().splitlines()
    assert len(lines) == 13  # the first step (a first ETA), then every 10%, then decoding and writing
    assert lines[0].startswith("img2vid: a.png: step 1/30 (3%)") and lines[0].endswith("ETA 29.0s")
    assert lines[1].startswith("img2vid: a.png: step 3/30 (10%)")
    assert lines[10].startswith("img2vid: a.png: step 30/30 (100%)") and "ETA" not in lines[10]
    assert lines[11:] == ["img2vid: a.png: decoding", "img2vid: a.png: writing"]

    tty = Stream(True)
    p = cli.Progress("a.png", 4, tty)
    p(Report("sampling", 1, 4, eta_s=3.0))
    p(Report("sampling", 2, 4, eta_s=2.0))
    text = tty.getvalue()
    assert "\n" not in text and text.count("\r") == 3
    assert "a.png 2/4 [" in text and "ETA 2.0s" in text
    p(Report("sampling", 4, 4, eta_s=0.0))
    p(Report("decoding", 4, 4))
    assert tty.getvalue().rstrip().endswith("decoding...") and "ETA 0" not in tty.getvalue()
    p.clear()
    assert tty.getvalue().endswith("\r")


def test_preview_file_and_interpolation(tmp_path, image, capsys):
    out, preview = tmp_path / "out.mp4", tmp_path / "live.webp"
    args = ["generate", str(image), *FAST, "--interpolate", "2", "--preview", str(preview), "-o", str(out)]
    assert cli.main(args) == 0
    frames, rate = read_av(out)
    assert len(frames) == (3 - 1) * 2 + 1 and rate == 14  # fps_id 6: 7 fps, doubled
    with Image.open(preview) as im:
        assert im.format == "WEBP" and im.n_frames == 3 and im.size == (32, 32)  # every frame at 1/8 size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".live.webp")]  # no temporary file left
    err = capsys.readouterr().err
    assert "decoding" in err and "interpolating" in err and "writing" in err


def test_missing_interpolation_weights_fail_before_loading(tmp_path, image, capsys, no_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["generate", str(image), *FAST, "--interpolate", "2", "--interpolate-weights", "nobody/rife"]
    assert cli.main([*args, "-o", str(tmp_path / "a.mp4")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not in the local huggingface_hub cache" in line and "hf download nobody/rife" in line


# --------------------------------------------------------------------------------------------------------------
# models, doctor, --version, python -m


def test_models_lists_every_preset(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name, cfg in PRESETS.items():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
        if cfg.hub_id:
            assert f"{cfg.hub_id} / {cfg.filename}" in out
    assert "random" in out


def test_doctor(capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_1234")
    assert cli.main(["doctor", "--model", "svd-xt"]) == 0
    out = capsys.readouterr().out
    import torch

    assert "torch:" in out and torch.__version__ in out
    assert "CUDA available:" in out and "memory mode (auto):" in out
    assert "codecs:" in out and "h264 (mp4)" in out and "webp" in out
    assert "PyAV:" in out and av.__version__ in out
    assert "stabilityai/stable-video-diffusion-img2vid-xt" in out and "svd_xt.safetensors" in out
    assert "HF_TOKEN:" in out and "hf_secret_value_1234" not in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"img2vid {img2vid.__version__}"


def test_python_dash_m(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["img2vid", "--version"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("img2vid", run_name="__main__")
    assert e.value.code == 0
    assert img2vid.__version__ in capsys.readouterr().out


def test_memory_modes_match_the_memory_module():
    assert cli.MEMORY_MODES == memory.MODES


def test_serve_is_hooked_up(capsys):
    assert cli.main(["serve", "--help"]) == 0
    assert "--port" in capsys.readouterr().out


def test_help_is_fast_and_complete(capsys):
    assert cli.main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--frames", "--fps-id", "--motion", "--seeds", "--size", "--decode-chunk", "--no-compile"):
        assert flag in out


# --------------------------------------------------------------------------------------------------------------
# Issue 19: checked before generating; SIGTERM cleans up like Ctrl-C


def test_unwritable_output_folder_fails_before_loading(tmp_path, image, capsys, no_load, monkeypatch):
    import errno
    import os

    real_open = os.open
    out = tmp_path / "out"
    out.mkdir()

    def read_only(path, flags, *args):  # root ignores permission bits: the refusal is simulated
        if flags & os.O_CREAT and str(path).startswith(str(out)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    assert cli.main(["generate", str(image), *FAST, "-o", str(out / "x.mp4")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"img2vid: error: cannot write {out / 'x.mp4'}: Permission denied ({out})"


def test_a_long_legal_name_is_written(tmp_path, image, capsys):
    name = "v" * 251 + ".mp4"  # 255 bytes, the longest name; its temporary must fit too
    assert cli.main(["generate", str(image), *FAST, "-o", str(tmp_path / name), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([image.name, name])


SIGTERM_SCRIPT = """
import pathlib, sys, time
from img2vid import cli, video

def stalled_write(tmp, kind, frames, rate, *text_and_xmp):
    tmp.write_bytes(b"half a video")
    pathlib.Path(sys.argv[1]).write_text(str(tmp))  # tell the test: the temporary exists now
    time.sleep(120)

video._write_av = stalled_write
sys.exit(cli.main(sys.argv[2:]))
"""


def test_sigterm_removes_the_half_written_output(tmp_path, image):
    import signal
    import time

    out, ready = tmp_path / "out", tmp_path / "ready"
    argv = ["generate", str(image), *FAST, "-o", str(out / "x.mp4"), "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(ready), *argv], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120  # a hang guard only
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    assert Path(ready.read_text()).exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    assert proc.stderr.read().strip() == "img2vid: terminated"
    assert list(out.iterdir()) == []  # no hidden .x.mp4.*.tmp left behind


def test_a_size_the_memory_cannot_hold_is_a_clear_error_exit_2(tmp_path, image, capsys, monkeypatch):
    from img2vid import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 300 * 2**20)
    out = tmp_path / "x.mp4"
    assert cli.main(["generate", str(image), *FAST, "--size", "2048x2048", "-o", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("img2vid: error: width, height, num_frames: 2048x2048 with 3 frames needs about ")
    assert line.endswith("free on the cpu: try a smaller size or fewer frames")
    assert list(tmp_path.iterdir()) == [image]


def test_extend_loop_and_watermark_reach_the_video(tmp_path, image, capsys):
    from img2vid import provenance, watermark
    from img2vid.video import read_metadata

    out = tmp_path / "long.gif"
    flags = ["--extend", "1", "--loop", "pingpong", "--watermark", "--seed", "4", "-o", str(out), "--quiet"]
    assert cli.main(["generate", str(image), *FAST, *flags]) == 0
    meta = read_metadata(out)
    assert meta["extend"] == 1 and meta["segment_seeds"] == [4, 5] and meta["loop"] == "pingpong"
    assert meta["watermark"] is True and meta["total_frames"] == 2 * (3 + 2) - 2
    with Image.open(out) as im:
        assert im.n_frames == 8 and im.info["loop"] == 0
        first = np.asarray(im.convert("RGB"))
    assert watermark.bit_accuracy(first) > 0.9  # through the GIF palette
    assert provenance.read_provenance(out)["model"] == "tiny"
    assert "wrote" in capsys.readouterr().out


def test_sign_without_the_c2pa_extra_says_how_to_install(tmp_path, image, capsys, no_load, monkeypatch):
    monkeypatch.setitem(sys.modules, "c2pa", None)  # import c2pa raises ImportError
    out = str(tmp_path / "x.mp4")
    assert cli.main(["generate", str(image), *FAST, "--sign", "a.pem", "b.key", "-o", out]) == 2
    assert 'pip install "img2vid[c2pa]"' in one_error_line(capsys.readouterr().err)


def test_a_later_segments_sampling_start_writes_no_preview(tmp_path):
    from img2vid.progress import Progress as Report

    preview = tmp_path / "live.webp"
    p = cli.Progress("a.png", 4, io.StringIO(), preview=preview)
    p(Report("sampling", 2, 4))  # with --extend, segment 2 starts sampling after 2 steps: no preview in it
    assert p.preview == preview and not preview.exists()

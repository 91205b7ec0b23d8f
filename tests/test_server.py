"""The HTTP job API, driven through the app (no outside bind), against the tiny random-weights model."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from contextlib import contextmanager

import av
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from img2vid.errors import ImageError  # noqa: E402
from img2vid.params import CHOICES, RANGES  # noqa: E402
from img2vid.server import JobResult, JobStore, LocalWorker, WorkerLost, create_app  # noqa: E402

SMALL = {"width": "256", "height": "256", "num_frames": "3", "num_steps": "2"}
DEADLINE_S = 120  # a hang guard only; jobs take a second or two


@pytest.fixture(scope="session")
def pipe():
    import img2vid

    return img2vid.load("tiny", device="cpu")


class GatedWorker:
    """Holds its first job at the first step until `release` is set, while still asking the dispatcher
    whether to go on; so a test can cancel or shut down a job that is certainly running."""

    def __init__(self, pipeline):
        self.inner = LocalWorker(pipeline)
        self.reached = threading.Event()
        self.release = threading.Event()

    def start(self):
        self.inner.start()

    def ready(self):
        return self.inner.ready()

    def error(self):
        return self.inner.error()

    def info(self):
        return self.inner.info()

    def close(self):
        self.inner.close()

    def holds(self, step, info) -> bool:
        """Where the job waits for `release`: its first step."""
        return step > 0

    def run(self, job_id, image, params, on_progress):
        def gated(step, total, info=None):
            if not self.reached.is_set() and self.holds(step, info or {}):
                self.reached.set()
                while not self.release.wait(0.01):
                    if not on_progress(step, total, info):
                        return False
            return on_progress(step, total, info)

        return self.inner.run(job_id, image, params, gated)


class DecodingGatedWorker(GatedWorker):
    """Holds its first job when it starts decoding: after every step, with a preview made."""

    def holds(self, step, info) -> bool:
        return info.get("phase") == "decoding"


def png(w=320, h=256, noise=False) -> bytes:
    if noise:
        a = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    else:
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@contextmanager
def client(data_dir, *args, **kw):
    kw.setdefault("poll_s", 0.05)
    kw.setdefault("stop_timeout", 30)
    with TestClient(create_app(data_dir, *args, **kw)) as c:
        yield c


def submit(c, image: bytes | None = None, headers=None, **params):
    fields = {**SMALL, **{k: str(v) for k, v in params.items()}}
    files = {"image": ("in.png", image if image is not None else png(), "image/png")}
    return c.post("/v1/jobs", data=fields, files=files, headers=headers)


def wait(c, job_id, statuses=("succeeded", "failed", "canceled"), headers=None) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        job = c.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job stuck at {job}"
        time.sleep(0.05)


def wait_event(event: threading.Event):
    assert event.wait(DEADLINE_S), "the worker never reached its first step"


# -- the happy path --------------------------------------------------------------------------------------


def test_submit_poll_download(tmp_path, pipe):
    image = png()
    with client(tmp_path, pipeline=pipe) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        model = c.get("/v1/model").json()
        assert model["model"] == pipe.name
        assert set(RANGES) | set(CHOICES) <= set(model["parameters"])
        assert model["parameters"]["num_steps"]["help"] == RANGES["num_steps"][2]
        assert model["defaults"]["num_frames"] == pipe.defaults["num_frames"]

        r = submit(c, image)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.headers["location"] == f"/v1/jobs/{job_id}"

        job = wait(c, job_id)
        assert job["status"] == "succeeded", job
        assert job["progress"] == {"step": 2, "total": 2}
        assert job["created"] and job["started"] and job["finished"]
        assert job["attempts"] == 1 and job["error"] is None
        # No seed sent: the server picked one and recorded it.
        assert isinstance(job["parameters"]["seed"], int)
        assert job["parameters"]["num_frames"] == 3

        video = c.get(job["video_url"])
        assert video.status_code == 200
        assert video.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(video.content)) as f:
            frames = list(f.decode(video=0))
        assert len(frames) == 3
        assert (frames[0].width, frames[0].height) == (256, 256)

        part = c.get(job["video_url"], headers={"Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == video.content[:100]

        assert c.get(job["image_url"]).content == image

        listing = c.get("/v1/jobs").json()
        assert listing["total"] == 1 and listing["jobs"][0]["id"] == job_id

        r = c.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 409 and "succeeded" in r.json()["detail"]


def test_watermark_loop_and_extend_fields(tmp_path, pipe):
    from img2vid import provenance, watermark

    with client(tmp_path, pipeline=pipe) as c:
        spec = c.get("/v1/model").json()["parameters"]
        assert spec["watermark"]["type"] == "bool" and spec["loop"]["choices"] == ["none", "pingpong"]
        assert (spec["extend"]["min"], spec["extend"]["max"]) == (0, 16)
        job = wait(c, submit(c, watermark="on", loop="pingpong", extend=1, seed=3).json()["id"])
        assert job["status"] == "succeeded", job
        assert job["parameters"]["watermark"] is True and job["parameters"]["extend"] == 1
        assert job["progress"] == {"step": 4, "total": 4}  # two segments of two steps
        video = c.get(job["video_url"]).content
    path = tmp_path / "v.mp4"
    path.write_bytes(video)
    assert provenance.read_provenance(path)["model"] == pipe.name
    with av.open(str(path)) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 2 * (3 + 2) - 2
    assert np.mean([watermark.bit_accuracy(fr) for fr in frames]) > 0.75  # H.264 weakens it


def test_seed_is_kept_exactly_and_history_pages_newest_first(tmp_path):
    with client(tmp_path) as c:  # no workers: the jobs just queue
        big = 2**63 - 1
        ids = [submit(c, seed=big - i).json()["id"] for i in range(3)]
        assert [c.get(f"/v1/jobs/{i}").json()["parameters"]["seed"] for i in ids] == [big, big - 1, big - 2]
        page = c.get("/v1/jobs", params={"limit": 2, "offset": 0}).json()
        assert page["total"] == 3 and [j["id"] for j in page["jobs"]] == ids[::-1][:2]
        page = c.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
        assert [j["id"] for j in page["jobs"]] == ids[:1]
        assert [c.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids] == [0, 1, 2]
        assert c.get("/v1/jobs", params={"limit": 0}).status_code == 422


# -- cancel ----------------------------------------------------------------------------------------------


def test_cancel_queued_and_running(tmp_path, pipe):
    worker = GatedWorker(pipe)
    with client(tmp_path, worker) as c:
        running = submit(c, num_steps=3).json()["id"]
        wait_event(worker.reached)
        queued = submit(c).json()["id"]
        assert c.get(f"/v1/jobs/{queued}").json()["status"] == "queued"

        r = c.delete(f"/v1/jobs/{queued}")
        assert r.status_code == 200 and r.json()["status"] == "canceled"

        r = c.delete(f"/v1/jobs/{running}")
        assert r.status_code == 202 and r.json()["cancel_requested"]
        job = wait(c, running)
        assert job["status"] == "canceled"
        assert job["progress"] == {"step": 1, "total": 3}  # stopped at the step it was on
        assert c.get(f"/v1/jobs/{running}/video").status_code == 404

        # The queued job was canceled before it started and never runs.
        job = c.get(f"/v1/jobs/{queued}").json()
        assert job["status"] == "canceled" and job["started"] is None
        assert c.delete(f"/v1/jobs/{queued}").status_code == 200


# -- restart and recovery --------------------------------------------------------------------------------


def test_restart_resumes_queued_and_interrupted_jobs(tmp_path, pipe):
    worker = GatedWorker(pipe)
    with client(tmp_path, worker) as c:
        interrupted = submit(c).json()["id"]
        wait_event(worker.reached)
        queued = submit(c).json()["id"]
    # Shutting down stopped the running job at its step and put it back in the queue, uncounted.
    with client(tmp_path) as c:
        job = c.get(f"/v1/jobs/{interrupted}").json()
        assert job["status"] == "queued" and job["attempts"] == 0
    with client(tmp_path, pipeline=pipe) as c:
        for job_id in [interrupted, queued]:
            job = wait(c, job_id)
            assert job["status"] == "succeeded", job
        assert c.get(f"/v1/jobs/{interrupted}").json()["attempts"] == 1


def _crash_while_running(data_dir, job_id):
    """What a killed process leaves behind: the job claimed and marked running, nothing else."""
    store = JobStore(data_dir)
    try:
        claimed = store.claim_next()
        assert claimed.id == job_id
    finally:
        store.close()


def test_job_running_at_a_crash_is_retried_once_then_failed(tmp_path):
    with client(tmp_path) as c:
        job_id = submit(c).json()["id"]
    _crash_while_running(tmp_path, job_id)
    with client(tmp_path) as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued" and job["attempts"] == 1
    _crash_while_running(tmp_path, job_id)
    with client(tmp_path) as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "failed" and job["attempts"] == 2
        assert "server stopped while this job was running" in job["error"]


def test_one_server_per_data_dir(tmp_path):
    from img2vid.server.store import StoreLocked

    with client(tmp_path), pytest.raises(StoreLocked):
        JobStore(tmp_path)


def test_readyz_while_loading_and_after_a_failed_load(tmp_path, pipe):
    gate = threading.Event()

    def slow_load():
        gate.wait(DEADLINE_S)
        return pipe

    with client(tmp_path / "a", LocalWorker(load=slow_load, name="tiny")) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "loading" in r.json()["detail"]
        assert c.get("/v1/model").status_code == 503
        assert c.get("/healthz").status_code == 200
        job_id = submit(c).json()["id"]  # accepted while loading; runs once ready
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        gate.set()
        assert wait(c, job_id, ("running", "succeeded"))["status"] in ("running", "succeeded")
        assert c.get("/readyz").status_code == 200
        # Leaving stops it at its next step: it goes back to the queue rather than to the history as done.

    def broken_load():
        raise FileNotFoundError("no checkpoint at /nowhere")

    with client(tmp_path / "b", LocalWorker(load=broken_load, name="tiny")) as c:
        deadline = time.monotonic() + DEADLINE_S
        while "failed to load" not in c.get("/readyz").json()["detail"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.get("/readyz").status_code == 503
        assert "/nowhere" in c.get("/v1/model").json()["detail"]
        assert submit(c).status_code == 503


class ScriptedWorker:
    """Answers each run() with the next outcome: an exception to raise or a JobResult."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)

    def start(self):
        pass

    def ready(self):
        return True

    def error(self):
        return None

    def info(self):
        return {"model": "scripted", "device": "cpu", "defaults": {}}

    def close(self):
        pass

    def run(self, job_id, image, params, on_progress):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def test_worker_failures_are_recorded_and_the_queue_goes_on(tmp_path):
    worker = ScriptedWorker(
        [
            ImageError("the image: too dark to animate"),
            RuntimeError("boom"),
            WorkerLost("actor died"),  # retried once...
            WorkerLost("actor died"),  # ...then given up
            JobResult(video=b"not really an mp4", params={"num_frames": 3}, fps=7.0),
        ]
    )
    with client(tmp_path, worker) as c:
        job = wait(c, submit(c).json()["id"])
        assert job["status"] == "failed" and job["error"] == "the image: too dark to animate"
        job = wait(c, submit(c).json()["id"])
        assert job["status"] == "failed" and job["error"] == "internal error: RuntimeError: boom"
        job = wait(c, submit(c).json()["id"])
        assert job["status"] == "failed" and job["attempts"] == 2 and "lost 2 times" in job["error"]
        job = wait(c, submit(c).json()["id"])
        assert job["status"] == "succeeded"
        assert job["resolved_parameters"] == {"num_frames": 3, "fps": 7.0}
        assert c.get(job["video_url"]).content == b"not really an mp4"


# -- refusals --------------------------------------------------------------------------------------------


def test_queue_limit_answers_429_with_retry_after(tmp_path):
    with client(tmp_path, max_queue=2) as c:
        assert submit(c).status_code == 202
        assert submit(c).status_code == 202
        r = submit(c)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert "queue is full" in r.json()["detail"]


def _bad_values():
    for name, (lo, hi, _) in RANGES.items():
        yield name, str(hi + 1 if isinstance(hi, int) else hi * 2)
        yield name, str(lo - 1)
    for name in CHOICES:
        yield name, "bogus"
    yield "num_frames", "two"
    yield "num_steps", "2.5"
    yield "cond_aug", "nan"
    yield "width", "300"  # in range, not a multiple of 64
    yield "interpolate", "3"  # in range, not a factor RIFE is run for
    yield "watermark", "maybe"
    yield "colour", "red"  # not a parameter at all


@pytest.mark.parametrize(("name", "value"), list(_bad_values()))
def test_bad_parameter_is_422_naming_the_field(tmp_path, name, value):
    with client(tmp_path) as c:
        r = submit(c, **{name: value})
        assert r.status_code == 422, (name, value, r.text)
        body = r.json()
        assert body["field"] == name
        assert name in body["detail"]
        assert c.get("/v1/jobs").json()["total"] == 0


def test_missing_or_empty_image_is_422(tmp_path):
    with client(tmp_path) as c:
        r = c.post("/v1/jobs", data=SMALL)
        assert r.status_code == 422 and r.json()["field"] == "image"
        r = c.post("/v1/jobs", data=SMALL, files={"image": ("a.png", b"", "image/png")})
        assert r.status_code == 422 and r.json()["field"] == "image"


def test_oversize_upload_is_413(tmp_path):
    with client(tmp_path, max_upload_mb=0.01) as c:
        r = submit(c, png(128, 128, noise=True))  # ~50 KB against a 10 KB limit
        assert r.status_code == 413
        assert "limit" in r.json()["detail"]
        # Far past the limit: refused while reading the body, with or without a Content-Length.
        huge = b"\x89PNG\r\n\x1a\n" + bytes(2_000_000)
        assert submit(c, huge).status_code == 413

        def chunks():
            yield b"--x\r\nContent-Disposition: form-data; name=image; filename=a.png\r\n\r\n"
            for _ in range(100):
                yield bytes(20_000)
            yield b"\r\n--x--\r\n"

        r = c.post("/v1/jobs", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        assert c.get("/v1/jobs").json()["total"] == 0


def test_not_an_image_is_415(tmp_path):
    buf = io.BytesIO()
    Image.open(io.BytesIO(png())).save(buf, "JPEG")
    jpeg = buf.getvalue()
    with client(tmp_path) as c:
        r = submit(c, b"just some text, not a picture\n" * 10)  # named in.png, sent as image/png
        assert r.status_code == 415
        assert "not an image" in r.json()["detail"]
        # Recognised as PNG/JPEG by their headers, but the pixels are cut short.
        for truncated in (png()[:300], jpeg[: len(jpeg) // 2]):
            r = submit(c, truncated)
            assert r.status_code == 415, r.text
        assert c.get("/v1/jobs").json()["total"] == 0
        assert submit(c, jpeg).status_code == 202


# -- access ----------------------------------------------------------------------------------------------


def test_token_required_on_everything_but_healthz_and_the_page(tmp_path):
    good = {"Authorization": "Bearer s3cret"}
    with client(tmp_path, token="s3cret") as c:
        for path in ["/v1/jobs", "/v1/model", "/readyz", "/openapi.json", "/docs", f"/v1/jobs/{'0' * 32}"]:
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
        assert submit(c).status_code == 401
        assert c.delete(f"/v1/jobs/{'0' * 32}").status_code == 401
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/jobs", headers={"Authorization": "s3cret"}).status_code == 401

        assert c.get("/healthz").status_code == 200
        assert c.get("/").status_code == 200  # the page itself holds nothing; it asks for the token
        assert c.get("/v1/jobs", headers=good).status_code == 200
        assert c.get("/v1/jobs", params={"token": "s3cret"}).status_code == 200
        assert c.get("/docs", params={"token": "s3cret"}).status_code == 200

        r = submit(c, headers=good)
        assert r.status_code == 202
        job_id = r.json()["id"]
        assert c.get(f"/v1/jobs/{job_id}/image").status_code == 401
        assert c.get(f"/v1/jobs/{job_id}/image", headers=good).status_code == 200


def test_require_token_without_token_is_refused(tmp_path):
    with pytest.raises(ValueError):
        create_app(tmp_path, require_token=True)


def test_serve_refuses_a_public_bind_without_a_token(tmp_path, monkeypatch):
    from img2vid.errors import Img2VidError
    from img2vid.server import serve

    monkeypatch.delenv("IMG2VID_TOKEN", raising=False)
    with pytest.raises(Img2VidError, match="token"):
        serve(host="0.0.0.0", port=1, data_dir=tmp_path)


def test_serve_refuses_a_device_it_does_not_have_before_starting(tmp_path):
    from img2vid.errors import Img2VidError
    from img2vid.server import serve

    with pytest.raises(Img2VidError, match="--device meta: img2vid runs on cpu, cuda or mps"):
        serve(port=1, data_dir=tmp_path / "data", device="meta")
    assert not (tmp_path / "data").exists()


def test_host_and_origin_checks(tmp_path):
    with client(tmp_path, allowed_hosts={"127.0.0.1", "localhost"}) as c:
        assert c.get("/v1/jobs").status_code == 400  # Host: testserver, as a rebinding attack would send
        local = {"Host": "127.0.0.1:7860"}
        assert c.get("/v1/jobs", headers=local).status_code == 200
        r = submit(c, headers={**local, "Origin": "http://evil.example"})
        assert r.status_code == 403
        assert submit(c, headers={**local, "Origin": "http://127.0.0.1:7860"}).status_code == 202


def test_paths_never_escape_the_job_folders(tmp_path):
    data = tmp_path / "data"
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    with client(data) as c:
        job_id = submit(c).json()["id"]
        probes = [
            "/v1/jobs/..%2f..%2fsecret.txt",
            "/v1/jobs/%2e%2e%2f%2e%2e%2fsecret.txt/image",
            "/v1/jobs/%2e%2e/image",
            "/v1/jobs/..%5c..%5csecret.txt/video",
            f"/v1/jobs/{job_id}%2f..%2f..%2f..%2fsecret.txt",
            f"/v1/jobs/{job_id}%2f..%2f..%2fjobs.sqlite3/image",
            "/v1/jobs/%2Fetc%2Fpasswd/image",
            "/v1/jobs//etc/passwd",
            "/v1/jobs/" + str(tmp_path / "secret.txt"),
            f"/v1/jobs/{job_id.upper()}/image",
            f"/v1/jobs/{job_id}x/image",
            "/v1/jobs/jobs.sqlite3/image",
            "/..%2fsecret.txt",
            "/style.css/..%2f..%2fsecret.txt",
        ]
        for path in probes:
            r = c.get(path)
            assert r.status_code in (400, 404, 405, 422), (path, r.status_code)
            assert b"TOP SECRET" not in r.content and b"root:" not in r.content and b"SQLite" not in r.content
            assert c.delete(path).status_code in (400, 404, 405, 422), path
        assert c.get(f"/v1/jobs/{job_id}/image").status_code == 200


def test_page_and_assets_are_served(tmp_path):
    with client(tmp_path) as c:
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for element_id in ["file", "generate", "progress", "video", "download", "cancel", "history", "error"]:
            assert f'id="{element_id}"' in page.text
        assert c.get("/app.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/style.css").headers["content-type"].startswith("text/css")
        assert "/v1/jobs" in c.get("/openapi.json").json()["paths"]


# -- issue 19: every failure ends the job and says why ---------------------------------------------------


def _fail_writes(monkeypatch, suffix: str, err: int):
    """Writes to files ending in `suffix` put a few bytes down, then fail with `err` (a full or read-only
    disk, simulated)."""
    import errno
    import os
    import pathlib

    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if not self.name.endswith(suffix):
            return real(self, data)
        real(self, data[:10])  # a partial file, as a write cut short leaves
        raise OSError(err, os.strerror(err), str(self))

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    return errno.errorcode[err]


@pytest.mark.parametrize("err", ["ENOSPC", "EACCES"])
def test_a_failed_video_write_fails_the_job_and_the_worker_goes_on(tmp_path, monkeypatch, err):
    import errno

    result = JobResult(video=b"an mp4" * 100, params={}, fps=7.0)
    with client(tmp_path, ScriptedWorker([result, result])) as c:
        name = _fail_writes(monkeypatch, ".part", getattr(errno, err))
        job = wait(c, submit(c).json()["id"])
        assert job["status"] == "failed", job
        folder = tmp_path / "jobs" / job["id"]
        assert job["error"].startswith(f"writing the video failed: {folder / 'out.mp4.part'}: ")
        assert job["error"].endswith(f"({name})")
        assert sorted(p.name for p in folder.iterdir()) == ["input.png"]  # no partial file left
        assert c.get(f"/v1/jobs/{job['id']}/video").status_code == 404
        monkeypatch.undo()
        assert wait(c, submit(c).json()["id"])["status"] == "succeeded"  # the worker went on


def test_a_failed_write_inside_the_worker_fails_the_job_with_the_path(tmp_path, monkeypatch, pipe):
    import errno

    def encode_then_run_out_of_space(tmp, kind, frames, rate, *text_and_xmp):
        tmp.write_bytes(b"half an mp4")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with client(tmp_path, pipeline=pipe) as c:
        monkeypatch.setattr("img2vid.video._write_av", encode_then_run_out_of_space)
        job = wait(c, submit(c).json()["id"])
        assert job["status"] == "failed", job
        assert job["error"].startswith("could not read or write a file: ")
        assert job["error"].endswith(".tmp: No space left on device (ENOSPC)")
        leftover = job["error"].removeprefix("could not read or write a file: ").split(": ")[0]
        assert not os.path.exists(leftover)  # the worker's partial mp4 is gone


def test_progress_that_cannot_be_recorded_is_logged_once(tmp_path, pipe, monkeypatch, caplog):
    import sqlite3

    def full(*args):
        raise sqlite3.OperationalError("database or disk is full")

    with client(tmp_path, pipeline=pipe) as c:
        monkeypatch.setattr(JobStore, "set_progress", full)
        with caplog.at_level("WARNING", logger="img2vid.server"):
            job = wait(c, submit(c, num_steps=4).json()["id"])
    assert job["status"] == "succeeded"
    progress = [r for r in caplog.records if "recording progress failed" in r.getMessage()]
    assert len(progress) == 1 and progress[0].exc_info is None


def test_cancel_ends_a_running_job_that_no_worker_holds(tmp_path):
    with client(tmp_path) as c:
        job_id = submit(c).json()["id"]
        c.app.state.ctx.store.claim_next()  # "running", as a slot that died mid-job would leave it
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        r = c.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["status"] == "canceled"
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"


def test_out_of_disk_space_refuses_new_jobs_with_507_and_readyz_says_why(tmp_path, monkeypatch, pipe):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    with client(tmp_path, pipeline=pipe, min_free_mb=100) as c:
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30, 5 * 2**20))
        r = submit(c)
        assert r.status_code == 507
        assert r.json()["detail"].startswith("out of disk space: 5 MB free in ")
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["detail"] == r.json()["detail"]
        assert c.get("/v1/jobs").json()["total"] == 0
        monkeypatch.undo()
        assert c.get("/readyz").status_code == 200
        assert submit(c).status_code == 202
        responses = c.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["responses"]
        assert {"202", "413", "415", "422", "429", "503", "507"} <= set(responses)


@pytest.mark.parametrize(("err", "status"), [("ENOSPC", 507), ("EACCES", 503)])
def test_a_failed_upload_write_is_refused_cleanly_never_500(tmp_path, monkeypatch, err, status):
    import errno

    with client(tmp_path) as c:
        name = _fail_writes(monkeypatch, "input.png", getattr(errno, err))
        r = submit(c)
        assert r.status_code == status, r.text
        assert (
            r.json()["detail"].startswith("storing the upload failed: ") and f"({name})" in r.json()["detail"]
        )
        monkeypatch.undo()
        assert c.get("/v1/jobs").json()["total"] == 0
        assert list((tmp_path / "jobs").iterdir()) == []  # no job folder, no partial image


def test_queue_limit_holds_under_concurrent_uploads(tmp_path):
    with client(tmp_path, max_queue=10) as c:  # no workers: jobs stay queued
        for _ in range(8):
            assert submit(c).status_code == 202
        big = png(1024, 1024, noise=True)  # ~3 MB each: the uploads overlap while they are read
        barrier = threading.Barrier(16)
        codes = []

        def post():
            barrier.wait()
            codes.append(submit(c, big).status_code)

        threads = [threading.Thread(target=post) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S)
        assert sorted(codes) == [202] * 2 + [429] * 14
        assert c.get("/v1/jobs").json()["total"] == 10


def test_uploads_are_decoded_a_few_at_a_time(tmp_path, monkeypatch):
    from img2vid.server import upload

    real, lock, now, most = upload.load_image, threading.Lock(), [0], [0]

    def counting_load(data):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.2)  # hold the decoded image a while, as a large one would take
        try:
            return real(data)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(upload, "load_image", counting_load)
    with client(tmp_path) as c:
        threads = [threading.Thread(target=submit, args=(c,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S)
        assert c.get("/v1/jobs").json()["total"] == 8
    assert most[0] == 2


def test_huge_offsets_are_refused_not_500(tmp_path):
    with client(tmp_path) as c:
        r = c.get("/v1/jobs", params={"offset": 2**63})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "offset"]
        r = c.get("/v1/jobs", params={"offset": 2**63 - 1})
        assert r.status_code == 200 and r.json()["jobs"] == []


def test_a_job_too_large_for_the_memory_is_refused_422_naming_the_fields(tmp_path, pipe, monkeypatch):
    from img2vid import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 300 * 2**20)
    with client(tmp_path, LocalWorker(pipe)) as c:  # the worker measures its memory when ready
        r = submit(c, width=2048, height=2048)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["field"] == "width" and body["fields"] == ["width", "height", "num_frames"]
        assert body["detail"].startswith("width, height, num_frames: 2048x2048 with 3 frames needs about ")
        assert c.get("/v1/jobs").json()["total"] == 0
        assert wait(c, submit(c).json()["id"])["status"] == "succeeded"  # a small one fits


def test_a_job_that_no_longer_fits_when_it_runs_fails_with_the_reason(tmp_path, pipe, monkeypatch):
    from img2vid import memory

    with client(tmp_path, LocalWorker(pipe)) as c:
        monkeypatch.setattr(memory, "free_bytes", lambda device: 300 * 2**20)  # memory taken meanwhile
        job = wait(c, submit(c, width=2048, height=2048).json()["id"])
        assert job["status"] == "failed" and job["progress"]["step"] == 0
        assert job["error"].startswith("width, height, num_frames: 2048x2048 with 3 frames needs about ")
        monkeypatch.undo()
        assert wait(c, submit(c).json()["id"])["status"] == "succeeded"


def test_a_worker_process_that_dies_fails_only_its_job(tmp_path):
    from process_helpers import tiny_in_300_mb_that_dies_on_seed_666

    from img2vid.server import ProcessWorker

    with client(tmp_path, ProcessWorker(tiny_in_300_mb_that_dies_on_seed_666, name="tiny")) as c:
        killed = wait(c, submit(c, seed=666).json()["id"])
        assert killed["status"] == "failed" and killed["attempts"] == 1
        assert killed["error"] == (
            "the worker process died while running this job "
            "(killed by SIGKILL, as the kernel does when memory runs out)"
        )
        job = wait(c, submit(c, seed=1).json()["id"])  # waits while a new process loads the model
        assert job["status"] == "succeeded" and job["progress"] == {"step": 2, "total": 2}
        # previews cross the process seam as bytes
        assert c.get(job["preview_url"]).headers["content-type"] == "image/webp"
        assert c.get("/readyz").status_code == 200 and c.get("/v1/model").json()["model"] == "tiny"
        assert c.get(job["video_url"]).status_code == 200
        # The worker process told the server how much memory it has: a job it cannot hold is refused.
        r = submit(c, width=2048, height=2048)
        assert r.status_code == 422 and r.json()["fields"] == ["width", "height", "num_frames"]


# -- live progress: phases, previews, events, interpolation -----------------------------------------------


def read_events(response):
    """(name, data) of each server-sent event of a streamed response, as they arrive."""
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: ") :])


def test_events_preview_and_phase_while_decoding(tmp_path, pipe):
    worker = DecodingGatedWorker(pipe)
    with client(tmp_path, worker) as c:
        job_id = submit(c).json()["id"]
        seen = []
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for name, body in read_events(r):
                seen.append((name, body["status"], body["phase"]))
                if body["phase"] == "decoding" and not worker.release.is_set():
                    # held at decoding: no "0 s left", and the preview of the last step is there
                    assert body["eta_s"] is None and body["progress"] == {"step": 2, "total": 2}
                    preview = c.get(body["preview_url"])
                    assert preview.status_code == 200 and preview.headers["content-type"] == "image/webp"
                    assert preview.headers["cache-control"] == "no-store"
                    with Image.open(io.BytesIO(preview.content)) as im:
                        assert im.n_frames == 3 and im.size == (32, 32)  # every frame, at latent size
                    assert c.get(f"/v1/jobs/{job_id}").json()["phase"] == "decoding"
                    worker.release.set()
        assert seen[-1] == ("end", "succeeded", None)
        assert ("progress", "running", "decoding") in seen


def test_no_preview_before_the_first_step(tmp_path):
    with client(tmp_path) as c:  # no workers: the job stays queued
        job_id = submit(c).json()["id"]
        r = c.get(f"/v1/jobs/{job_id}/preview")
        assert r.status_code == 404 and "has not reached its first step" in r.json()["detail"]
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["preview_url"] is None and job["phase"] is None
        assert c.get("/v1/jobs/" + "0" * 32 + "/events").status_code == 404


def test_interpolation_through_the_api(tmp_path, pipe):
    with client(tmp_path, pipeline=pipe) as c:
        job = wait(c, submit(c, interpolate=4).json()["id"])
        assert job["status"] == "succeeded", job["error"]
        resolved = job["resolved_parameters"]
        assert resolved["interpolate"] == 4 and resolved["fps"] == 28 and resolved["frames_generated"] == 3
        with av.open(io.BytesIO(c.get(job["video_url"]).content)) as f:
            assert len(list(f.decode(video=0))) == (3 - 1) * 4 + 1


def test_a_later_segments_sampling_start_is_reported_without_a_preview():
    from img2vid.progress import Progress as Report
    from img2vid.server.worker import ProgressReports

    seen = []
    reports = ProgressReports(lambda step, total, info: seen.append((step, total, info)) or True, {})
    assert reports(Report("sampling", 2, 4)) is True  # extend: segment 2 starts sampling after 2 steps
    assert seen == [(2, 4, {"phase": "sampling", "eta_s": None})]

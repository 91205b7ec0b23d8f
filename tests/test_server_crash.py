"""The API process killed by SIGKILL with jobs queued and running, then started again: every accepted job
ends, none runs twice at once, and no partial file is left. Also: the server never imports Ray unasked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from test_server import DEADLINE_S, SMALL, png  # noqa: E402

TESTS = Path(__file__).parent
# The app and process worker `img2vid serve` builds, over the tiny model with a slow seed (4242).
SERVER = """
import sys, uvicorn
from process_helpers import tiny_with_faults
from img2vid.server import ProcessWorker, create_app
app = create_app(sys.argv[1], ProcessWorker(tiny_with_faults, name="tiny"), poll_s=0.05)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(check, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return result


@contextmanager
def server(data_dir):
    """A server process on a free port, ready (model loaded); yields (process, HTTP client)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(data_dir), str(port)], env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:

            def ready():
                try:
                    return c.get("/readyz").status_code == 200
                except httpx.TransportError:
                    assert proc.poll() is None, "the server exited"
                    return False

            _until(ready, "the server never became ready")
            yield proc, c
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(DEADLINE_S)


def _submit(c, **params) -> str:
    fields = {**SMALL, **{k: str(v) for k, v in params.items()}}
    r = c.post("/v1/jobs", data=fields, files={"image": ("in.png", png(), "image/png")})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_api_process_killed_and_restarted_every_job_ends_without_partial_files(tmp_path):
    with server(tmp_path) as (proc, c):
        running = _submit(c, seed=4242, num_steps=6)
        queued = [_submit(c, seed=s) for s in (1, 2)]

        def on_its_way():
            job = c.get(f"/v1/jobs/{running}").json()
            return job["status"] == "running" and job["progress"]["step"] >= 1

        _until(on_its_way, "the slow job never started")
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(DEADLINE_S)
    # The worker process ends with its server, so the re-queued job cannot run twice at once.
    gone, alive = psutil.wait_procs(children, timeout=DEADLINE_S)
    assert alive == []
    with server(tmp_path) as (proc, c):

        def all_ended():
            jobs = [c.get(f"/v1/jobs/{i}").json() for i in [running, *queued]]
            return jobs if all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs) else None

        jobs = _until(all_ended, "not every job ended")
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs
    assert jobs[0]["attempts"] == 2 and [j["attempts"] for j in jobs[1:]] == [1, 1]
    for job in jobs:
        assert sorted(p.name for p in (tmp_path / "jobs" / job["id"]).iterdir()) == ["input.png", "out.mp4"]
    assert list(tmp_path.rglob("*.part")) == []


def test_the_server_does_not_import_ray_unless_asked():
    code = (
        "import sys, img2vid.server, img2vid.server.main, img2vid.server.app, img2vid.cli;"
        "from img2vid.server.main import add_serve_arguments; import argparse;"
        "add_serve_arguments(argparse.ArgumentParser()).parse_args(['--ray']);"
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ray_options_are_checked_before_starting(tmp_path):
    from img2vid.errors import Img2VidError
    from img2vid.server import serve

    with pytest.raises(Img2VidError, match="--ray-workers needs --ray"):
        serve(port=1, data_dir=tmp_path / "a", ray_workers=2)
    with pytest.raises(Img2VidError, match="--device does not apply with --ray"):
        serve(port=1, data_dir=tmp_path / "b", ray="", device="cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

"""The job API with its workers as Ray actors: a local Ray on 2 CPUs, two CPU actors, the tiny model.

One Ray session and one server serve the whole module, since starting Ray and loading the actors dominates.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'img2vid[ray]'")
pytest.importorskip("fastapi")

from test_server import DEADLINE_S, client, submit, wait  # noqa: E402

from img2vid.server.ray_worker import RayWorker  # noqa: E402

TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def ray_session():
    # The actors import the tests' model loaders by name, as the worker processes do.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, old) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if old is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = old


class Recorder:
    """Wraps each worker's run() to note which worker ran which job, and any job run twice at once."""

    def __init__(self, workers):
        self.runs: list[tuple[str, int]] = []
        self.overlaps: list[str] = []
        self._now: set[str] = set()
        self._lock = threading.Lock()
        for index, worker in enumerate(workers):
            worker.run = self._wrap(index, worker.run)

    def _wrap(self, index, run):
        def recorded(job_id, *args):
            with self._lock:
                self.runs.append((job_id, index))
                if job_id in self._now:
                    self.overlaps.append(job_id)
                self._now.add(job_id)
            try:
                return run(job_id, *args)
            finally:
                with self._lock:
                    self._now.discard(job_id)

        return recorded

    def workers_of(self, job_id) -> list[int]:
        return [index for j, index in self.runs if j == job_id]


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from process_helpers import tiny_with_faults

    workers = [RayWorker(tiny_with_faults, {"num_cpus": 1}, name="tiny") for _ in range(2)]
    recorder = Recorder(workers)
    with client(tmp_path_factory.mktemp("ray"), workers) as c:
        yield c, workers, recorder
    for worker in workers:
        worker.close()


def _running(c, job_id, attempt=1) -> dict:
    """Wait until the job's `attempt` has done a step, so it is surely on an actor; returns its worker."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["attempts"] == attempt and job["progress"]["step"] >= 1:
            workers = c.get("/v1/queue").json()["workers"]
            return next(w for w in workers if w["job"] == job_id)
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.05)


def _idle(c, index) -> dict:
    """Wait until worker `index` has its model loaded and no job."""
    deadline = time.monotonic() + DEADLINE_S
    while (worker := c.get("/v1/queue").json()["workers"][index])["state"] != "idle":
        assert time.monotonic() < deadline, worker
        time.sleep(0.05)
    return worker


def test_jobs_spread_over_the_actors_and_all_finish(served):
    c, workers, recorder = served
    ids = [submit(c).json()["id"] for _ in range(6)]
    for job_id in ids:
        job = wait(c, job_id)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert c.get(job["video_url"]).status_code == 200
    assert {index for job_id in ids for index in recorder.workers_of(job_id)} == {0, 1}
    queue = c.get("/v1/queue").json()
    assert [w["state"] for w in queue["workers"]] == ["idle", "idle"]
    assert all(w["kind"] == "ray" and w["host"] for w in queue["workers"])
    assert c.get("/v1/model").json()["model"] == "tiny"


def test_an_actor_killed_mid_job_has_its_job_finished_by_another(served):
    c, workers, recorder = served
    job_id = submit(c, seed=4242, num_steps=4).json()["id"]
    busy = _running(c, job_id)
    ray.kill(workers[busy["index"]].actor)

    job = wait(c, job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    first, second = recorder.workers_of(job_id)
    assert first == busy["index"] and second != first
    assert recorder.overlaps == []
    # A new actor replaces the killed one, loads the model and takes jobs again.
    replaced = _idle(c, busy["index"])
    assert replaced["restarts"] == 1 and replaced["actor"] != busy["actor"]


def test_cuda_out_of_memory_on_an_actor_fails_its_job_and_the_next_ones_run(served):
    c, workers, recorder = served
    failed = wait(c, submit(c, seed=777).json()["id"])
    assert failed["status"] == "failed" and failed["attempts"] == 1
    assert failed["error"].startswith("out of GPU memory: try fewer frames")
    assert all(wait(c, submit(c).json()["id"])["status"] == "succeeded" for _ in range(2))


def test_cancel_reaches_the_actor(served):
    c, workers, recorder = served
    job_id = submit(c, seed=4242, num_steps=4).json()["id"]
    _running(c, job_id, attempt=1)
    assert c.delete(f"/v1/jobs/{job_id}").status_code == 202
    job = wait(c, job_id)
    assert job["status"] == "canceled" and job["progress"]["step"] < 4, job
    assert wait(c, submit(c).json()["id"])["status"] == "succeeded"


def test_an_actors_job_shows_its_phase_and_live_preview(served):
    c, workers, recorder = served
    job_id = submit(c, seed=4242, num_steps=4).json()["id"]
    _running(c, job_id)
    deadline = time.monotonic() + DEADLINE_S
    while (job := c.get(f"/v1/jobs/{job_id}").json())["preview_url"] is None:
        assert job["status"] == "running" and time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["phase"] == "sampling", job  # a second a step: the first preview comes long before decoding
    r = c.get(job["preview_url"])
    assert r.status_code == 200 and r.headers["content-type"] in ("image/webp", "image/gif"), r.headers
    assert wait(c, job_id)["status"] == "succeeded"


def test_an_actor_lost_twice_fails_its_job_with_the_reason(served):
    c, workers, recorder = served
    for index in range(2):
        _idle(c, index)  # both actors up, so the second attempt does not wait for a reload
    job_id = submit(c, seed=4242, num_steps=4).json()["id"]
    for attempt in (1, 2):
        ray.kill(workers[_running(c, job_id, attempt)["index"]].actor)
    job = wait(c, job_id)
    assert job["status"] == "failed" and job["attempts"] == 2
    assert "lost 2 times" in job["error"] and "ray.kill" in job["error"], job["error"]
    assert recorder.overlaps == []
    for index in range(2):  # both actors come back
        _idle(c, index)
    assert wait(c, submit(c).json()["id"])["status"] == "succeeded"

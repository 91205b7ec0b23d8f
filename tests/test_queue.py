"""The job API's queue features, with or without Ray: priority, Idempotency-Key, webhooks, retention,
GET /v1/queue, and a CUDA out-of-memory error that fails only its job."""

from __future__ import annotations

import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import test_server  # noqa: E402
from test_server import DEADLINE_S, GatedWorker, client, png, submit, wait, wait_event  # noqa: E402

from img2vid.server import JobResult, JobStore, LocalWorker, retention, store  # noqa: E402
from img2vid.server.webhooks import SIGNATURE_HEADER, sign  # noqa: E402

SECRET = "webhook-s3cret"
pipe = test_server.pipe  # the session's tiny pipeline fixture


class RecordingWorker(test_server.ScriptedWorker):
    """Runs every job at once, remembering the order; each video is `size` bytes."""

    def __init__(self, size=1000):
        super().__init__([])
        self.order, self.size = [], size

    def info(self):
        return {"model": "recording", "device": "cpu", "defaults": {}}

    def run(self, job_id, image, params, on_progress):
        self.order.append(job_id)
        return JobResult(video=b"v" * self.size, params={}, fps=7.0)


# -- priority and GET /v1/queue --------------------------------------------------------------------------


def test_higher_priority_runs_first_fifo_within(tmp_path):
    with client(tmp_path) as c:  # no workers: the jobs just queue
        names = ["low", "normal", "high", "normal", "high", "low"]
        ids = [submit(c, priority=p).json()["id"] for p in names]
        submit_default = submit(c).json()
        assert submit_default["priority"] == "normal"
        expected = [ids[2], ids[4], ids[1], ids[3], submit_default["id"], ids[0], ids[5]]
        queue = c.get("/v1/queue").json()
        assert [j["id"] for j in queue["jobs"]] == expected
        assert [j["position"] for j in queue["jobs"]] == list(range(7))
        assert queue["queued"] == 7 and queue["running"] == 0 and queue["workers"] == []
        positions = {i: c.get(f"/v1/jobs/{i}").json()["queue_position"] for i in expected}
        assert [positions[i] for i in expected] == list(range(7))
        r = submit(c, priority="urgent")
        assert r.status_code == 422 and r.json()["field"] == "priority"
    worker = RecordingWorker()
    with client(tmp_path, worker) as c:
        for job_id in expected:
            assert wait(c, job_id)["status"] == "succeeded"
    assert worker.order == expected


def test_queue_shows_each_worker_and_its_job(tmp_path, pipe):
    worker = GatedWorker(pipe)
    with client(tmp_path, worker) as c:
        running = submit(c).json()["id"]
        wait_event(worker.reached)
        queued = submit(c).json()["id"]
        queue = c.get("/v1/queue").json()
        assert queue["running"] == 1 and queue["queued"] == 1
        assert queue["jobs"] == [{"id": queued, "position": 0, "priority": "normal"}]
        assert queue["workers"] == [{"index": 0, "state": "busy", "job": running, "error": None}]
        worker.release.set()
        assert wait(c, queued)["status"] == "succeeded"
        assert c.get("/v1/queue").json()["workers"][0]["state"] == "idle"


# -- Idempotency-Key -------------------------------------------------------------------------------------


def test_idempotency_key_gives_the_same_job_and_refuses_another_body(tmp_path, monkeypatch):
    image = png()
    with client(tmp_path) as c:
        first = submit(c, image, headers={"Idempotency-Key": "order-1"})
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers
        again = submit(c, image, headers={"Idempotency-Key": "order-1"})
        assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        # The server-chosen seed is the first request's, not a new one.
        assert again.json()["parameters"]["seed"] == first.json()["parameters"]["seed"]
        assert c.get("/v1/jobs").json()["total"] == 1

        for changed in ({"num_steps": 3}, {"priority": "high"}):
            r = submit(c, image, headers={"Idempotency-Key": "order-1"}, **changed)
            assert r.status_code == 422 and r.json()["field"] == "Idempotency-Key"
            assert first.json()["id"] in r.json()["detail"]
        r = submit(c, png(noise=True), headers={"Idempotency-Key": "order-1"})
        assert r.status_code == 422
        assert submit(c, image, headers={"Idempotency-Key": "bad key"}).status_code == 422
        other = submit(c, image, headers={"Idempotency-Key": "order-2"})
        assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
        assert c.get("/v1/jobs").json()["total"] == 2
        post = c.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]
        assert {"name": "Idempotency-Key", "in": "header"}.items() <= post["parameters"][0].items()

        monkeypatch.setattr(store, "IDEMPOTENCY_S", -1)  # every key has expired
        later = submit(c, image, headers={"Idempotency-Key": "order-1"})
        assert later.status_code == 202 and later.json()["id"] not in (first.json()["id"], other.json()["id"])


def test_concurrent_requests_with_one_key_make_one_job(tmp_path):
    image = png()
    with client(tmp_path) as c:
        barrier = threading.Barrier(6)
        ids = []

        def post():
            barrier.wait()
            ids.append(submit(c, image, headers={"Idempotency-Key": "same"}).json()["id"])

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S)
        assert len(ids) == 6 and len(set(ids)) == 1
        assert c.get("/v1/jobs").json()["total"] == 1
        assert len(list((tmp_path / "jobs").iterdir())) == 1  # the losers' uploads are gone


# -- webhooks --------------------------------------------------------------------------------------------


class Receiver:
    """A local HTTP server recording each POST; answers `fail_first` 500s before its 200s."""

    def __init__(self, fail_first=0):
        self.posts, self.fail_first, self.got = [], fail_first, threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append((self.headers, body))  # case-insensitive names
                ok = len(outer.posts) > outer.fail_first
                self.send_response(200 if ok else 500)
                self.end_headers()
                if ok:
                    outer.got.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []
    yield lambda fail_first=0: made.append(Receiver(fail_first)) or made[-1]
    for r in made:
        r.close()


def _closed_port_url() -> str:
    r = Receiver()
    r.close()
    return r.url  # nothing listens there any more


def test_webhook_is_signed_retried_and_never_blocks_the_queue(tmp_path, receivers, caplog):
    good, flaky = receivers(), receivers(fail_first=2)
    with client(tmp_path, RecordingWorker(), webhook_secret=SECRET, webhook_backoff_s=0.01) as c:
        with caplog.at_level("WARNING", logger="img2vid.server"):
            dead = wait(c, submit(c, webhook=_closed_port_url()).json()["id"])
            job = wait(c, submit(c, webhook=good.url).json()["id"])
            flaky_job = wait(c, submit(c, webhook=flaky.url).json()["id"])
            assert good.got.wait(DEADLINE_S) and flaky.got.wait(DEADLINE_S)
        assert dead["status"] == job["status"] == flaky_job["status"] == "succeeded"
        assert len(good.posts) == 1
        headers, body = good.posts[0]
        assert hmac.compare_digest(headers[SIGNATURE_HEADER], sign(SECRET, body))
        assert headers[SIGNATURE_HEADER] != sign("another secret", body)
        sent = json.loads(body)
        assert sent["id"] == job["id"] and sent["status"] == "succeeded" and sent["webhook"] == good.url
        assert len(flaky.posts) == 3  # two 500s, then delivered
        assert len({h["X-Img2vid-Delivery"] for h, _ in flaky.posts}) == 1  # one delivery, retried
    assert any(
        "retrying" in r.getMessage() and "Connection refused" in r.getMessage() for r in caplog.records
    )


def test_webhook_tells_a_canceled_job_and_needs_a_secret(tmp_path, receivers):
    good = receivers()
    with client(tmp_path / "a") as c:
        r = submit(c, webhook=good.url)
        assert r.status_code == 422 and r.json()["field"] == "webhook"
    with client(tmp_path / "b", webhook_secret=SECRET, webhook_backoff_s=0.01) as c:
        r = submit(c, webhook="file:///etc/passwd")
        assert r.status_code == 422 and r.json()["field"] == "webhook"
        job_id = submit(c, webhook=good.url).json()["id"]
        assert c.delete(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
        assert good.got.wait(DEADLINE_S)
        assert json.loads(good.posts[0][1])["status"] == "canceled"


# -- retention -------------------------------------------------------------------------------------------


def test_retention_deletes_finished_files_oldest_first(tmp_path):
    with client(tmp_path, RecordingWorker(size=100_000)) as c:
        ids = [wait(c, submit(c).json()["id"])["id"] for _ in range(4)]
    s = JobStore(tmp_path)
    try:
        now = time.time()
        for age_days, job_id in zip([10, 5, 2, 1], ids, strict=True):
            s._update(job_id, "finished = ?", (now - age_days * 86400,))
        queued = s.create({}, png(), ".png", "image/png")  # waiting jobs are never touched
        assert retention.sweep(s, max_age_s=7 * 86400, max_bytes=None, now=now) == [ids[0]]
        total = sum(retention.folder_bytes(p) for p in (tmp_path / "jobs").iterdir())
        # Room for about two of the three videos left: the oldest one goes.
        assert retention.sweep(s, None, max_bytes=total - 50_000, now=now) == [ids[1]]
        assert retention.sweep(s, 7 * 86400, total - 50_000, now=now) == []
        assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == sorted([*ids[2:], queued.id])
    finally:
        s.close()
    with client(tmp_path, retain_days=3) as c:  # the server sweeps at start-up: job 2 is 2 days old
        gone = c.get(f"/v1/jobs/{ids[1]}").json()
        assert gone["status"] == "succeeded" and gone["files_deleted"] and gone["video_url"] is None
        r = c.get(f"/v1/jobs/{ids[1]}/video")
        assert r.status_code == 410 and "retention" in r.json()["detail"]
        assert c.get(f"/v1/jobs/{ids[2]}/video").status_code == 200


# -- CUDA out of memory inside a job ---------------------------------------------------------------------


def test_cuda_out_of_memory_fails_only_its_job(tmp_path, pipe):
    from process_helpers import OomOnSeed777

    with client(tmp_path, LocalWorker(OomOnSeed777(pipe))) as c:
        job = wait(c, submit(c, seed=777).json()["id"])
        assert job["status"] == "failed" and job["attempts"] == 1
        assert job["error"].startswith("out of GPU memory: try fewer frames")
        assert wait(c, submit(c, seed=1).json()["id"])["status"] == "succeeded"

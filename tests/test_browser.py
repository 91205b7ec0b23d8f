"""The web page in a real headless Chromium against a real uvicorn server on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time

import av
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not shutil.which(CHROMIUM):
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
uvicorn = pytest.importorskip("uvicorn")

from test_server import (  # noqa: E402, F401  (pipe: the shared model fixture)
    DecodingGatedWorker,
    GatedWorker,
    pipe,
    png,
)

from img2vid.server import create_app  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 90_000  # a hang guard: a job takes seconds, more when other work shares the two cores
sync_api.expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture
def worker_class():
    return GatedWorker


@pytest.fixture
def worker(pipe, worker_class):  # noqa: F811
    return worker_class(pipe)


@pytest.fixture
def token():
    return None


@pytest.fixture
def server(tmp_path, worker, token):
    app = create_app(tmp_path / "data", worker, token=token, poll_s=0.05, allowed_hosts={"127.0.0.1"})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the port is ours before the server starts: no race for a free one
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    worker.release.set()
    srv.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True)  # fresh localStorage for each test
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        context.close()


def test_generate_in_the_browser(server, worker, page, tmp_path):
    expect = sync_api.expect
    image = tmp_path / "cat.png"
    image.write_bytes(png())

    page.goto(server + "/")
    expect(page.locator("#p-num_steps")).to_be_visible()  # the form is built from /v1/model
    expect(page.locator("#generate")).to_be_disabled()
    page.set_input_files("#file", str(image))
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#preview")).to_be_visible()

    # A bad value is named next to its field, and nothing is queued.
    page.fill("#p-num_steps", "999")
    page.click("#generate")
    expect(page.locator("#err-num_steps")).to_contain_text("between")
    expect(page.locator("#error")).to_be_visible()

    for name, value in {"num_steps": "2", "num_frames": "3", "width": "256", "height": "256"}.items():
        page.fill(f"#p-{name}", value)
    page.click("#seed-random")
    assert page.input_value("#p-seed").isdigit()
    page.click("#generate")

    # The worker holds the job at its first step until the page has shown it: the bar moves for sure.
    expect(page.locator("#progress-text")).to_contain_text("step 1 / 2")
    assert page.eval_on_selector("#progress", "p => [p.value, p.max]") == [1, 2]
    expect(page.locator("#cancel")).to_be_visible()
    worker.release.set()

    expect(page.locator("#job-status")).to_have_attribute("data-status", "succeeded")
    page.wait_for_function(
        "() => { const v = document.querySelector('#video');"
        " return !v.hidden && v.readyState >= 2 && !v.paused && v.currentTime > 0; }"
    )
    assert page.eval_on_selector("#progress", "p => p.value") == 2
    assert page.eval_on_selector("#video", "v => [v.muted, v.loop, v.controls]") == [True, True, True]

    with page.expect_download() as info:
        page.click("#download")
    download = info.value
    assert download.suggested_filename.endswith(".mp4")
    with av.open(download.path()) as f:
        frames = list(f.decode(video=0))
    assert len(frames) == 3 and (frames[0].width, frames[0].height) == (256, 256)

    # The history lists the job with its parameters; clicking it shows it again.
    item = page.locator("#history .history-item")
    expect(item).to_have_count(1)
    expect(item).to_contain_text("2 steps")
    item.click()
    expect(page.locator("#job-params")).to_contain_text("Steps2")

    # Phone width: one column.
    page.set_viewport_size({"width": 390, "height": 844})
    left = page.locator("#input-card").bounding_box()
    right = page.locator("#output-card").bounding_box()
    assert right["y"] >= left["y"] + left["height"] and abs(right["x"] - left["x"]) < 1


def test_cancel_in_the_browser(server, worker, page, tmp_path):
    expect = sync_api.expect
    image = tmp_path / "cat.png"
    image.write_bytes(png())
    page.goto(server + "/")
    page.set_input_files("#file", str(image))
    for name, value in {"num_steps": "2", "num_frames": "3", "width": "256", "height": "256"}.items():
        page.fill(f"#p-{name}", value)
    page.click("#generate")
    expect(page.locator("#progress-text")).to_contain_text("step 1 / 2")
    page.click("#cancel")
    expect(page.locator("#job-status")).to_have_attribute("data-status", "canceled")
    expect(page.locator("#video")).to_be_hidden()
    expect(page.locator("#download")).to_be_hidden()


@pytest.mark.parametrize("token", ["s3cret-token"])
def test_token_is_asked_once_and_media_still_plays(server, worker, page, tmp_path, token):
    expect = sync_api.expect
    image = tmp_path / "cat.png"
    image.write_bytes(png())
    worker.release.set()

    page.goto(server + "/")
    expect(page.locator("#token-form")).to_be_visible()
    page.fill("#token", "wrong")
    page.click("#token-save")
    expect(page.locator("#model-status")).to_contain_text("not accepted")
    page.fill("#token", token)
    page.click("#token-save")
    expect(page.locator("#token-form")).to_be_hidden()
    expect(page.locator("#p-num_steps")).to_be_visible()

    page.set_input_files("#file", str(image))
    for name, value in {"num_steps": "2", "num_frames": "3", "width": "256", "height": "256"}.items():
        page.fill(f"#p-{name}", value)
    page.click("#generate")
    expect(page.locator("#job-status")).to_have_attribute("data-status", "succeeded")
    # <video> cannot send the Authorization header: the page fetched the bytes and plays a blob.
    page.wait_for_function(
        "() => { const v = document.querySelector('#video');"
        " return v.src.startsWith('blob:') && v.readyState >= 2 && !v.paused && v.currentTime > 0; }"
    )
    with page.expect_download() as info:
        page.click("#download")
    with av.open(info.value.path()) as f:
        assert len(list(f.decode(video=0))) == 3
    expect(page.locator("#history .history-item img")).to_have_attribute("src", re.compile("^blob:"))

    page.reload()  # kept in localStorage: not asked again
    expect(page.locator("#p-num_steps")).to_be_visible()
    expect(page.locator("#token-form")).to_be_hidden()


@pytest.mark.parametrize("worker_class", [DecodingGatedWorker])
def test_live_preview_and_phase(server, worker, page, tmp_path, worker_class):
    expect = sync_api.expect
    image = tmp_path / "cat.png"
    image.write_bytes(png())
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server + "/")
    page.set_input_files("#file", str(image))
    for name, value in {"num_steps": "2", "num_frames": "3", "width": "256", "height": "256"}.items():
        page.fill(f"#p-{name}", value)
    page.click("#generate")

    # The worker holds the job as it starts decoding: the preview of the last step shows, animated.
    expect(page.locator("#progress-text")).to_have_attribute("data-phase", "decoding")
    expect(page.locator("#progress-text")).to_have_text("Decoding…")
    expect(page.locator("#live-preview")).to_be_visible()
    page.wait_for_function("() => document.querySelector('#live-preview').naturalWidth === 32")
    assert "/preview?v=" in page.eval_on_selector("#live-preview", "img => img.src")
    worker.release.set()

    expect(page.locator("#progress-text")).to_have_attribute("data-phase", "done")
    expect(page.locator("#live-preview")).to_be_hidden()
    expect(page.locator("#video")).to_be_visible()
    assert any("/events" in url for url in requests)  # followed by server-sent events, not polling
    assert not [url for url in requests if re.search(r"/v1/jobs/[0-9a-f]{32}$", url)]

"""The HTTP job API and the web page, one FastAPI app over one job queue.

create_app() builds it without binding anything, so tests drive it through TestClient; serve() in
main.py adds the model loading and uvicorn.
"""

from __future__ import annotations

import hmac
import io
import logging
import re
import secrets
import time
import warnings
from collections.abc import Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from starlette.datastructures import Headers, UploadFile

from ..errors import ImageError, ParameterError
from ..image import load_image
from ..params import CHOICES, INTS, PARAM_NAMES, RANGES, SIDE_MULTIPLE, GenerateParams
from .dispatcher import Dispatcher
from .store import Job, JobStore, valid_id
from .worker import LocalWorker, Worker

log = logging.getLogger("img2vid.server")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
WEB_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# The page and its assets hold no data, and a browser must load them before it can ask for the token.
OPEN_PATHS = frozenset({"/healthz", *WEB_FILES})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

# params.py gives ranges help text; the choice parameters need a line too for the page.
CHOICE_HELP = {
    "guidance": "how the guidance scale moves from min_cfg (first frame) to max_cfg (last frame)",
    "sampler": "the ODE solver: euler is the reference, heun and dpmpp_2m need fewer steps",
    "fit": "how an image of another shape becomes width x height: crop the overflow or pad the rest",
}
NONE_MEANS = {
    "width": "1024 (576 for a portrait image)",
    "height": "576 (1024 for a portrait image)",
    "seed": "random",
    "decode_chunk_size": "the model's default (the reference decodes 14 frames at a time)",
}
IMAGE_EXT = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff"}
MULTIPART_SLACK = 64 * 1024  # room for the parameter fields and multipart framing around the image
INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
PAGE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-frame-options", b"DENY"),
]


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


class _Guard:
    """Pure ASGI (no body buffering): Host and Origin checks, the bearer token, security headers."""

    def __init__(self, app, token: str | None, allowed_hosts: frozenset[str] | None):
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts

    def _token_ok(self, scope, headers: Headers) -> bool:
        given = ""
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        else:
            # <video src>, a download link or /docs cannot send a header; a query parameter can.
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        response = None
        if self.allowed_hosts is not None:
            # A loopback server without a token must not answer pages that reached it by DNS rebinding.
            name = urlsplit("//" + host).hostname or ""
            if name not in self.allowed_hosts:
                response = _error(400, f"host {host!r} is not allowed; use http://127.0.0.1 or localhost")
        if response is None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            # Another site's page may POST a form here (no CORS preflight for multipart); refuse it.
            if origin is not None and urlsplit(origin).netloc != host:
                response = _error(403, f"cross-origin request from {origin} refused")
        needs_token = self.token is not None and scope["path"] not in OPEN_PATHS
        if response is None and needs_token and not self._token_ok(scope, headers):
            response = _error(
                401,
                "this server needs a token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if response is not None:
            return await response(scope, receive, send)

        # Not on /docs: Swagger UI comes from a CDN with inline script, which this policy would block.
        extra = SECURITY_HEADERS + (PAGE_HEADERS if scope["path"] in WEB_FILES else [])

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Context:
    def __init__(self, data_dir, workers, max_queue, max_upload_bytes, max_attempts, poll_s, stop_timeout):
        self.data_dir = data_dir
        self.workers: list[Worker] = workers
        self.max_queue = max_queue
        self.max_upload_bytes = max_upload_bytes
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.stop_timeout = stop_timeout
        self.store: JobStore | None = None
        self.dispatcher: Dispatcher | None = None

    def get_store(self) -> JobStore:
        if self.store is None:
            raise HTTPException(503, "the server is starting or stopping")
        return self.store

    def ready_worker(self) -> Worker | None:
        return next((w for w in self.workers if w.ready()), None)

    def not_ready_reason(self) -> str:
        if not self.workers:
            return "no workers: this server only keeps the queue"
        errors = [w.error() for w in self.workers if w.error()]
        return "; ".join(errors) if errors else "the model is loading"


def _eta(job: Job, now: float) -> float | None:
    if job.status != "running" or not job.step or not job.total or job.progress_at is None or not job.started:
        return None
    per_step = (job.progress_at - job.started) / job.step
    return round(max(0.0, per_step * (job.total - job.step) - (now - job.progress_at)), 1)


def job_json(job: Job, store: JobStore) -> dict:
    base = f"/v1/jobs/{job.id}"
    return {
        "id": job.id,
        "status": job.status,
        "progress": {"step": job.step, "total": job.total},
        "eta_s": _eta(job, time.time()),
        "queue_position": store.queue_position(job),
        "parameters": job.params,
        "resolved_parameters": job.resolved,
        "error": job.error,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "created": _iso(job.created),
        "started": _iso(job.started),
        "finished": _iso(job.finished),
        "url": base,
        "image_url": base + "/image",
        "video_url": base + "/video" if job.status == "succeeded" else None,
    }


def parameter_spec() -> dict:
    """Ranges, choices and help for every generate parameter, straight from params.py."""
    spec = {}
    for name in PARAM_NAMES:
        if name in CHOICES:
            spec[name] = {"type": "choice", "choices": list(CHOICES[name]), "help": CHOICE_HELP.get(name, "")}
        else:
            lo, hi, help_text = RANGES[name]
            kind = "int" if name in INTS else "float"
            spec[name] = {"type": kind, "min": lo, "max": hi, "help": help_text}
            if name in ("width", "height"):
                spec[name]["multiple_of"] = SIDE_MULTIPLE
        if name in NONE_MEANS:
            spec[name]["none_means"] = NONE_MEANS[name]
    return spec


def _multipart_schema() -> dict:
    props: dict = {"image": {"type": "string", "format": "binary", "description": "the input image"}}
    for name, s in parameter_spec().items():
        if s["type"] == "choice":
            props[name] = {"type": "string", "enum": s["choices"], "description": s["help"]}
        else:
            props[name] = {
                "type": "integer" if s["type"] == "int" else "number",
                "minimum": s["min"],
                "maximum": s["max"],
                "description": s["help"],
            }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["image"], "properties": props}
                }
            },
        }
    }


def _sniff_image(data: bytes) -> tuple[str, str]:
    """(extension, mime type) of an image Pillow recognises by its content; raises HTTPException."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image has the real limit
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.verify()
    except Image.DecompressionBombError:
        raise HTTPException(413, "the image has too many pixels") from None
    except Exception:
        raise HTTPException(
            415, "the upload is not an image this server can read (PNG, JPEG, WebP, ...)"
        ) from None
    try:
        # verify() reads no pixels: decode now so a truncated or oversized image is refused here, with the
        # pipeline's own message, instead of queueing a job that can only fail.
        load_image(data).close()
    except ImageError as e:
        raise HTTPException(415, str(e).replace("image bytes: ", "the image: ")) from None
    return IMAGE_EXT.get(fmt, ".img"), Image.MIME.get(fmt, "application/octet-stream")


def _parse_params(form) -> dict:
    values = {}
    for key in form:
        if key == "image":
            continue
        if key not in PARAM_NAMES:
            raise ParameterError(key, "unknown parameter")
        items = form.getlist(key)
        if len(items) != 1 or not isinstance(items[0], str):
            raise ParameterError(key, "give one value")
        text = items[0].strip()
        if text == "":
            continue  # an empty form field means "use the default"
        # params.check() parses integers through float, which rounds seeds above 2**53; parse them exactly.
        values[key] = int(text) if key in INTS and INT_TEXT.fullmatch(text) else text
    return GenerateParams(**values).validate().as_dict()


def create_app(
    data_dir,
    workers: Worker | Sequence[Worker] | None = None,
    *,
    pipeline=None,
    token: str | None = None,
    require_token: bool | None = None,
    max_queue: int = 100,
    max_upload_mb: float = 20,
    allowed_hosts: Sequence[str] | None = None,
    max_attempts: int = 2,
    poll_s: float = 1.0,
    stop_timeout: float = 30.0,
) -> FastAPI:
    """The app over the job store in `data_dir`.

    workers: one Worker per GPU; or pipeline: a loaded pipeline, run by one LocalWorker. Neither gives a
    server that only keeps the queue. require_token (default: whether a token is given) makes every route
    but /healthz and the static page need `Authorization: Bearer <token>` (or `?token=`). allowed_hosts
    limits the Host header (serve() sets the loopback names when bound to loopback without a token).
    """
    if pipeline is not None:
        if workers is not None:
            raise ValueError("give workers or pipeline, not both")
        workers = [LocalWorker(pipeline)]
    elif workers is None:
        workers = []
    elif not isinstance(workers, Sequence):
        workers = [workers]
    if require_token is None:
        require_token = token is not None
    if require_token and not token:
        raise ValueError("require_token needs a token")
    ctx = _Context(
        data_dir,
        list(workers),
        max_queue,
        int(max_upload_mb * 1024 * 1024),
        max_attempts,
        poll_s,
        stop_timeout,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = JobStore(ctx.data_dir, max_attempts=ctx.max_attempts)
        for job_id, status in store.recover():
            log.warning("job %s was running when the server stopped: now %s", job_id, status)
        ctx.store = store
        ctx.dispatcher = Dispatcher(store, ctx.workers, poll_s=ctx.poll_s)
        ctx.dispatcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(ctx.dispatcher.stop, ctx.stop_timeout)
            ctx.store = None
            store.close()

    app = FastAPI(
        title="img2vid",
        summary="Stable Video Diffusion image-to-video: a job queue",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.add_middleware(
        _Guard,
        token=token if require_token else None,
        allowed_hosts=frozenset(allowed_hosts) if allowed_hosts is not None else None,
    )

    def web_file(path: str):
        name, media_type = WEB_FILES[path]

        def handler():
            return FileResponse(WEB_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"})

        return handler

    for path in WEB_FILES:
        app.add_api_route(path, web_file(path), methods=["GET"], include_in_schema=False)

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request):
        # Only reached with a valid token (or none needed); pass it on so Swagger can fetch the schema.
        t = request.query_params.get("token")
        url = "/openapi.json" + (f"?token={quote(t)}" if t else "")
        return get_swagger_ui_html(openapi_url=url, title="img2vid API")

    @app.get("/healthz", tags=["health"])
    def healthz():
        """200 while the process is up."""
        return {"ok": True}

    @app.get("/readyz", tags=["health"])
    def readyz():
        """200 once a worker has its model loaded, 503 before (or when loading failed)."""
        worker = ctx.ready_worker()
        if worker is None or ctx.store is None:
            return _error(503, ctx.not_ready_reason())
        return {"ready": True, "workers": sum(w.ready() for w in ctx.workers)}

    @app.get("/v1/model", tags=["model"])
    def model():
        """The model, its defaults, and every parameter's range and help (for the web page)."""
        worker = ctx.ready_worker()
        if worker is None:
            return _error(503, ctx.not_ready_reason())
        info = worker.info()
        defaults = {**GenerateParams().as_dict(), **info.get("defaults", {})}
        return {
            "model": info.get("model"),
            "device": info.get("device"),
            "workers": len(ctx.workers),
            "defaults": {k: defaults.get(k) for k in PARAM_NAMES},
            "parameters": parameter_spec(),
            "max_upload_mb": ctx.max_upload_bytes / (1024 * 1024),
            "max_queue": ctx.max_queue,
        }

    @app.post("/v1/jobs", status_code=202, tags=["jobs"], openapi_extra=_multipart_schema())
    async def submit(request: Request):
        """Queue a job: multipart form with `image` and any generate parameters (omitted = model default;
        omitted seed = a random one, recorded). 422 names a bad field, 413 too large, 415 not an image,
        429 queue full."""
        store = ctx.get_store()
        if ctx.workers and all(w.error() for w in ctx.workers):
            return _error(503, ctx.not_ready_reason())  # queueing would only make the job wait forever
        queued = await run_in_threadpool(store.count, "queued")
        if queued >= ctx.max_queue:
            durations = await run_in_threadpool(store.recent_durations)
            per_job = sum(durations) / len(durations) if durations else 30.0
            retry = int(min(3600, max(1, per_job / max(1, len(ctx.workers)))))
            return _error(
                429,
                f"the queue is full ({queued} jobs waiting); try again later",
                {"Retry-After": str(retry)},
            )
        limit = ctx.max_upload_bytes
        too_large = f"the upload is larger than the {limit / 2**20:g} MB limit"
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + MULTIPART_SLACK:
            return _error(413, too_large)

        received = 0

        async def receive_limited():
            # Count while reading: a chunked upload has no Content-Length to trust.
            nonlocal received
            message = await request.receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit + MULTIPART_SLACK:
                    raise HTTPException(413, too_large)
            return message

        limited = Request(request.scope, receive_limited)
        form = await limited.form(max_files=1, max_fields=len(PARAM_NAMES) + 1, max_part_size=4096)
        try:
            try:
                params = _parse_params(form)
            except ParameterError as e:
                return _error(422, str(e), field=e.field)
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                return _error(422, "image: an image file is required", field="image")
            if upload.size is not None and upload.size > limit:
                return _error(413, too_large)
            data = await upload.read(limit + 1)
            if len(data) > limit:
                return _error(413, too_large)
            if not data:
                return _error(422, "image: the file is empty", field="image")
            ext, mime = await run_in_threadpool(_sniff_image, data)
        finally:
            await form.close()
        if params["seed"] is None:
            # Below 2**32 so the seed survives JavaScript numbers in the page intact.
            params["seed"] = secrets.randbelow(2**32)
        job = await run_in_threadpool(store.create, params, data, ext, mime)
        ctx.dispatcher.wake()
        return JSONResponse(job_json(job, store), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0)):
        """The history, newest first."""
        store = ctx.get_store()
        jobs, total = store.list(limit, offset)
        return {"jobs": [job_json(j, store) for j in jobs], "total": total, "limit": limit, "offset": offset}

    def find(job_id: str) -> tuple[JobStore, Job]:
        store = ctx.get_store()
        job = store.get(job_id) if valid_id(job_id) else None
        if job is None:
            raise HTTPException(404, "no such job")
        return store, job

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str):
        """Status, progress {step, total}, eta_s, parameters, error, timestamps, video url."""
        store, job = find(job_id)
        return job_json(job, store)

    @app.get("/v1/jobs/{job_id}/video", tags=["jobs"], response_class=FileResponse)
    def get_video(job_id: str):
        """The mp4 of a succeeded job (Range requests supported)."""
        store, job = find(job_id)
        path = store.video_path(job)
        if job.status != "succeeded" or path is None or not path.is_file():
            raise HTTPException(404, f"no video: the job is {job.status}")
        return FileResponse(
            path,
            media_type="video/mp4",
            filename=f"img2vid-{job.id[:8]}.mp4",
            content_disposition_type="inline",
        )

    @app.get("/v1/jobs/{job_id}/image", tags=["jobs"], response_class=FileResponse)
    def get_image(job_id: str):
        """The job's input image."""
        store, job = find(job_id)
        path = store.image_path(job)
        if not path.is_file():
            raise HTTPException(404, "the input image is gone")
        return FileResponse(path, media_type=job.image_type)

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    def cancel_job(job_id: str):
        """Cancel: a queued job at once (200), a running one at its next step (202)."""
        store, job = find(job_id)
        if job.status in ("succeeded", "failed"):
            return _error(409, f"the job already {job.status}")
        job = store.cancel(job_id)
        if job.status == "running":
            ctx.dispatcher.cancel(job_id)
            return JSONResponse(job_json(job, store), status_code=202)
        return job_json(job, store)

    return app

"""`img2vid serve`: load the model on every GPU (or the CPU) and run the app under uvicorn."""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import os
from pathlib import Path

from ..errors import Img2VidError
from ..params import DTYPES, MEMORY_MODES
from .process import ProcessWorker
from .store import JobStore, StoreLocked
from .webhooks import SECRET_ENV

TOKEN_ENV = "IMG2VID_TOKEN"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "img2vid" / "server"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _accel_choice(args):
    if not args.no_compile:
        return args.accel
    from ..accel import without_compiled

    return without_compiled(args.accel)


def _loader(model: str, device: str, dtype=None, memory: str = "auto", accel=None):
    """The picklable call that loads the model on `device` (in a child process or a Ray actor)."""
    import img2vid

    return functools.partial(img2vid.load, model, device=device, dtype=dtype, memory=memory, accel=accel)


def make_workers(
    model: str, device=None, dtype=None, memory: str = "auto", accel=None, log_level: str = "warning"
) -> list[ProcessWorker]:
    """One worker per GPU when no device is named, else one on `device`. Each loads its model in a process
    of its own, in the background: a generation that dies there fails only its job."""
    if device is None:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [f"cuda:{i}" for i in range(n)] or ["cpu"]
    else:
        devices = [device]
    return [
        ProcessWorker(_loader(model, d, dtype, memory, accel), name=model, log_level=log_level.upper())
        for d in devices
    ]


def make_ray_workers(model: str, ray: str, ray_workers: int | None, dtype, memory, accel, log_level: str):
    """Ray actors at the cluster `ray` ("" = RAY_ADDRESS or a new local one): one per GPU, or
    `ray_workers` CPU actors."""
    try:
        from . import ray_worker
    except ImportError as e:
        raise Img2VidError(f"img2vid serve --ray needs {e.name}: pip install 'img2vid[ray]'") from None
    ray_worker.connect(ray or None)

    def load_on(device: str):
        return _loader(model, device, dtype, memory, accel)

    return ray_worker.make_ray_workers(load_on, ray_workers, name=model, log_level=log_level.upper())


def _close(workers, ray: str | None) -> None:
    for w in workers:
        w.close()
    if ray is not None:
        from .ray_worker import disconnect

        disconnect()


def serve(
    host: str = "127.0.0.1",
    port: int = 7860,
    model: str = "svd-xt",
    data_dir=None,
    token: str | None = None,
    device=None,
    dtype=None,
    memory: str = "auto",
    accel=None,
    max_queue: int = 100,
    max_upload_mb: float = 20,
    min_free_mb: float = 100,
    log_level: str = "info",
    ray: str | None = None,
    ray_workers: int | None = None,
    webhook_secret: str | None = None,
    retain_days: float | None = None,
    retain_gb: float | None = None,
) -> None:
    """Serve the job API and the web page until interrupted. Raises Img2VidError when it cannot start.
    ray: None runs the workers here; "" or an address runs them as Ray actors (see docs/ray.md)."""
    try:
        import uvicorn

        from .app import LOOPBACK_NAMES, create_app
    except ImportError as e:
        raise Img2VidError(f"img2vid serve needs {e.name}: pip install 'img2vid[serve]'") from None

    token = _check_token(host, token or os.environ.get(TOKEN_ENV) or None)
    from ..params import check_device

    check_device(device)  # a worker on a device that does not exist would only fail to load, in the log
    _check_ray_options(ray, ray_workers, device)
    webhook_secret = webhook_secret or os.environ.get(SECRET_ENV) or None
    data_dir = _check_data_dir(Path(data_dir) if data_dir is not None else default_data_dir())
    if ray is None:
        workers = make_workers(model, device, dtype, memory, accel, log_level)
    else:
        workers = make_ray_workers(model, ray, ray_workers, dtype, memory, accel, log_level)
    app = create_app(
        data_dir,
        workers,
        token=token,
        max_queue=max_queue,
        max_upload_mb=max_upload_mb,
        min_free_mb=min_free_mb,
        allowed_hosts=LOOPBACK_NAMES | {host} if is_loopback(host) and not token else None,
        webhook_secret=webhook_secret,
        retain_days=retain_days,
        retain_gb=retain_gb,
    )
    _announce(log_level, f"serving {model} from {data_dir} on {_url(host, port)}  (API docs: /docs)")
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        _close(workers, ray)


def _check_token(host: str, token: str | None) -> str | None:
    if not is_loopback(host) and not token:
        raise Img2VidError(
            f"binding {host} opens the server to the network: give a token with --token or {TOKEN_ENV}"
        )
    return token


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _announce(log_level: str, what: str) -> None:
    logging.getLogger("img2vid.server").setLevel(log_level.upper())
    if not logging.getLogger("img2vid").handlers:  # the CLI already installed one: don't print twice
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"img2vid: {what}", flush=True)


def _check_data_dir(data_dir: Path) -> Path:
    try:
        JobStore(data_dir).close()  # fail here, with a message, rather than inside uvicorn's start-up
    except StoreLocked as e:
        raise Img2VidError(str(e)) from None
    except OSError as e:
        raise Img2VidError(f"cannot use data directory {data_dir}: {e}") from None
    return data_dir


def _check_ray_options(ray: str | None, ray_workers: int | None, device) -> None:
    if ray is None and ray_workers is not None:
        raise Img2VidError("--ray-workers needs --ray")
    if ray is not None and device is not None:
        raise Img2VidError(
            "--device does not apply with --ray: actors get one GPU each, or --ray-workers CPUs"
        )
    if ray_workers is not None and ray_workers < 1:
        raise Img2VidError("--ray-workers: give at least 1")


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--model", default="svd-xt", help="model variant to load (default svd-xt)")
    p.add_argument("--data", default=None, help=f"job store directory (default {default_data_dir()})")
    p.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' (or set {TOKEN_ENV}, which keeps it out of `ps`)",
    )
    p.add_argument("--device", default=None, help="torch device (default: one worker per GPU, else cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="weights dtype (default: fp16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--memory",
        default="auto",
        choices=MEMORY_MODES,
        help="fast: all on the GPU; low: fits about 6 GiB; auto: by free VRAM (default)",
    )
    p.add_argument(
        "--no-compile", action="store_true", help="never compile: eager networks, no compiled artifacts"
    )
    p.add_argument(
        "--accel", metavar="PATHS", help="fast paths: auto (default), none, or a list (see generate)"
    )
    p.add_argument("--max-queue", type=int, default=100, help="queued jobs before POST answers 429")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest image upload in MB")
    p.add_argument(
        "--min-free-mb",
        type=float,
        default=100,
        help="free disk space the data directory needs for new jobs (below it POST answers 507)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return _add_scale_arguments(p)


def _add_scale_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Ray workers, webhooks and output retention."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the workers as Ray actors, one per GPU of the cluster at ADDRESS "
        "(default: RAY_ADDRESS, else a new local Ray); needs img2vid[ray]",
    )
    p.add_argument(
        "--ray-workers", type=int, metavar="N", help="with --ray: N CPU actors instead of GPU ones"
    )
    p.add_argument(
        "--webhook-secret",
        default=None,
        help=f"sign the webhooks jobs ask for with this HMAC-SHA256 key (or set {SECRET_ENV})",
    )
    p.add_argument("--retain-days", type=float, help="delete finished jobs' files after this many days")
    p.add_argument(
        "--retain-gb", type=float, help="delete finished jobs' files, oldest first, above this size"
    )
    return p


def run_serve(args: argparse.Namespace) -> int:
    serve(
        host=args.host,
        port=args.port,
        model=args.model,
        data_dir=args.data,
        token=args.token,
        device=args.device,
        dtype=args.dtype,
        memory=args.memory,
        accel=_accel_choice(args),
        max_queue=args.max_queue,
        max_upload_mb=args.max_upload_mb,
        min_free_mb=args.min_free_mb,
        log_level=args.log_level,
        ray=args.ray,
        ray_workers=args.ray_workers,
        webhook_secret=args.webhook_secret,
        retain_days=args.retain_days,
        retain_gb=args.retain_gb,
    )
    return 0


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `serve` to an argparse subparsers object; the parsed args carry func=run_serve."""
    p = subparsers.add_parser(
        "serve",
        help="HTTP job API and web page",
        description="Serve the image-to-video job API (/docs) and a web page (/) on one queue.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def serve_main(argv=None) -> int:
    p = add_serve_arguments(argparse.ArgumentParser(prog="img2vid serve", description="Serve the job API."))
    args = p.parse_args(argv)
    try:
        return run_serve(args)
    except Img2VidError as e:
        p.exit(2, f"img2vid serve: error: {e}\n")

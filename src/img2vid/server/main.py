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


def make_workers(
    model: str, device=None, dtype=None, memory: str = "auto", accel=None, log_level: str = "warning"
) -> list[ProcessWorker]:
    """One worker per GPU when no device is named, else one on `device`. Each loads its model in a process
    of its own, in the background: a generation that dies there fails only its job."""
    import img2vid

    if device is None:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [f"cuda:{i}" for i in range(n)] or ["cpu"]
    else:
        devices = [device]
    return [
        ProcessWorker(
            functools.partial(img2vid.load, model, device=d, dtype=dtype, memory=memory, accel=accel),
            name=model,
            log_level=log_level.upper(),
        )
        for d in devices
    ]


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
) -> None:
    """Serve the job API and the web page until interrupted. Raises Img2VidError when it cannot start."""
    try:
        import uvicorn

        from .app import LOOPBACK_NAMES, create_app
    except ImportError as e:
        raise Img2VidError(f"img2vid serve needs {e.name}: pip install 'img2vid[serve]'") from None

    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise Img2VidError(
            f"binding {host} opens the server to the network: give a token with --token or {TOKEN_ENV}"
        )
    from ..params import check_device

    check_device(device)  # a worker on a device that does not exist would only fail to load, in the log
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        JobStore(data_dir).close()  # fail here, with a message, rather than inside uvicorn's start-up
    except StoreLocked as e:
        raise Img2VidError(str(e)) from None
    except OSError as e:
        raise Img2VidError(f"cannot use data directory {data_dir}: {e}") from None
    workers = make_workers(model, device, dtype, memory, accel, log_level)
    app = create_app(
        data_dir,
        workers,
        token=token,
        max_queue=max_queue,
        max_upload_mb=max_upload_mb,
        min_free_mb=min_free_mb,
        allowed_hosts=LOOPBACK_NAMES | {host} if is_loopback(host) and not token else None,
    )
    logging.getLogger("img2vid.server").setLevel(log_level.upper())
    if not logging.getLogger("img2vid").handlers:  # the CLI already installed one: don't print twice
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shown = f"[{host}]" if ":" in host else host
    print(
        f"img2vid: serving {model} from {data_dir} on http://{shown}:{port}/  (API docs: /docs)", flush=True
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        for w in workers:
            w.close()


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

"""The `img2vid serve` HTTP job API and web page.

create_app() builds the FastAPI app (no bind); serve() loads the model and runs it under uvicorn.
Names load lazily so `img2vid.server.main` (the CLI hook) imports without FastAPI installed.
"""

from importlib import import_module

_EXPORTS = {
    "create_app": ".app",
    "add_serve_parser": ".main",
    "serve": ".main",
    "serve_main": ".main",
    "JobStore": ".store",
    "JobResult": ".worker",
    "LocalWorker": ".worker",
    "ProcessWorker": ".process",
    "Worker": ".worker",
    "WorkerLost": ".worker",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)

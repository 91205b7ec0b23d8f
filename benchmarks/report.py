"""Shared by the per-level kernel benchmarks: measure each level, print it, and keep the JSON file current."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def levels(
    res: dict, shapes: list[tuple], name: Callable[..., str], measure: Callable[..., dict], path: Path
):
    """res[name(*shape)] = measure(*shape) for each shape, printed as it comes and written to path after each
    (a call cut short by its time limit keeps what it measured)."""
    for shape in shapes:
        r = res[name(*shape)] = measure(*shape)
        rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
        print(*shape, json.dumps(rounded), flush=True)
        Path(path).write_text(json.dumps(res, indent=1))


def with_tflops(r: dict, flop: float) -> dict:
    """r with a "*_TFLOPs" entry beside each "*_ms" timing of `flop` floating-point operations."""
    for key in list(r):
        if key.endswith("_ms"):
            r[key.replace("_ms", "_TFLOPs")] = flop / (r[key] / 1e3) / 1e12
    return r

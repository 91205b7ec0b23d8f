"""The model the workers run and every parameter's range, choices and help (the web page builds its form
from this)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ...params import BOOLS, CHOICES, INTS, PARAM_NAMES, RANGES, SIDE_MULTIPLE, GenerateParams
from ..context import Context, error, get_context

router = APIRouter(tags=["model"])

# params.py gives ranges help text; the choice parameters need a line too for the page.
CHOICE_HELP = {
    "guidance": "how the guidance scale moves from min_cfg (first frame) to max_cfg (last frame)",
    "sampler": "the ODE solver: euler is the reference, heun and dpmpp_2m need fewer steps",
    "fit": "how an image of another shape becomes width x height: crop the overflow or pad the rest",
    "loop": "pingpong plays the video forward then backward (2T-2 frames), so it loops without a jump",
}
NONE_MEANS = {
    "width": "1024 (576 for a portrait image)",
    "height": "576 (1024 for a portrait image)",
    "seed": "random",
    "decode_chunk_size": "the model's default (the reference decodes 14 frames at a time)",
}


def parameter_spec() -> dict:
    """Ranges, choices and help for every generate parameter, straight from params.py."""
    spec = {}
    for name in PARAM_NAMES:
        if name in CHOICES:
            spec[name] = {"type": "choice", "choices": list(CHOICES[name]), "help": CHOICE_HELP.get(name, "")}
        elif name in BOOLS:
            spec[name] = {"type": "bool", "help": BOOLS[name]}
        else:
            lo, hi, help_text = RANGES[name]
            kind = "int" if name in INTS else "float"
            spec[name] = {"type": kind, "min": lo, "max": hi, "help": help_text}
            if name in ("width", "height"):
                spec[name]["multiple_of"] = SIDE_MULTIPLE
        if name in NONE_MEANS:
            spec[name]["none_means"] = NONE_MEANS[name]
    return spec


@router.get("/v1/model")
def model(ctx: Context = Depends(get_context)):
    """The model, its defaults, and every parameter's range and help (for the web page)."""
    worker = ctx.ready_worker()
    if worker is None:
        return error(503, ctx.not_ready_reason())
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

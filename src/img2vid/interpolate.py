"""Frame interpolation with RIFE (img2vid.models.rife): k-1 new frames between each pair, the originals kept.

Weights: a .safetensors file of the v4.13 flownet, from a local path or the hub (`owner/name/file.safetensors`,
or `owner/name` for DEFAULT_FILE), default DEFAULT_WEIGHTS, overridable with IMG2VID_RIFE_WEIGHTS; "random"
builds random weights (tests, benchmarks).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import _open_safetensors, _refuse_pickle, hub_resolve, key_problems
from .errors import CheckpointError
from .models import init_random
from .models.rife import MULTIPLE, IFNet

DEFAULT_REPO = "imaginairy/rife-interpolation"
DEFAULT_FILE = "rife-flownet-4.13.2.safetensors"
DEFAULT_WEIGHTS = f"{DEFAULT_REPO}/{DEFAULT_FILE}"
ENV = "IMG2VID_RIFE_WEIGHTS"
PAIRS_AT_ONCE = 4  # bounds the full-resolution activations of one batch


def weights_source(source: str | os.PathLike | None = None) -> str:
    """The weights asked for: `source`, else IMG2VID_RIFE_WEIGHTS, else DEFAULT_WEIGHTS."""
    return str(source or os.environ.get(ENV) or DEFAULT_WEIGHTS)


def resolve_weights(source: str | os.PathLike | None = None) -> str:
    """The weights asked for (see `weights_source`) as a local file, downloaded if need be, or "random"."""
    source = weights_source(source)
    return source if source == "random" else str(_weights_path(source))


def _weights_path(source: str) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    parts = source.split("/")
    if len(parts) < 2 or not all(parts):
        raise CheckpointError(
            f"interpolation weights {source!r}: no such file, and not a hub id (owner/name[/file.safetensors])"
        )
    filename = "/".join(parts[2:]) or DEFAULT_FILE
    return hub_resolve("/".join(parts[:2]), filename)


def load_interpolator(source=None, device="cpu", dtype=torch.float32) -> IFNet:
    """The RIFE flownet from `source` (see the module's doc), loaded strictly: CheckpointError names every
    missing, unexpected or mis-shaped key, and says how to get the file when the hub cannot be reached."""
    source = weights_source(source)
    if source == "random":
        return init_random(IFNet(), seed=0).to(device, dtype).eval()
    path = _weights_path(source)
    _refuse_pickle(path)
    handle = _open_safetensors(path)
    keys = {
        k.removeprefix("module."): k for k in handle.keys()
    }  # Practical-RIFE saves with DataParallel's prefix
    with torch.device("meta"):
        net = IFNet()
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    present = {k: tuple(handle.get_slice(full).get_shape()) for k, full in keys.items()}
    problems = key_problems(expected, present)
    if problems:
        raise CheckpointError(f"{path}: not a RIFE v4.13 flownet: " + " | ".join(problems))
    state = {k: handle.get_tensor(keys[k]).to(device, dtype) for k in expected}
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


@torch.no_grad()
def in_between(net: IFNet, frames: torch.Tensor, factor: int) -> torch.Tensor:
    """frames (T, 3, H, W) in [0, 1] -> the new frames ((T-1) * (factor-1), 3, H, W) in [0, 1]: for each pair in
    turn, the frames at t = 1/factor, 2/factor, ... (v4 models take any t: no recursive halving)."""
    p = next(net.parameters())
    T, _, H, W = frames.shape
    pad = (0, -W % MULTIPLE, 0, -H % MULTIPLE)
    x = F.pad(frames.to(p.device, p.dtype), pad, mode="replicate")
    out = torch.empty((T - 1, factor - 1, 3, H, W), device=frames.device, dtype=torch.float32)
    for i in range(0, T - 1, PAIRS_AT_ONCE):
        a, b = x[i : i + PAIRS_AT_ONCE], x[i + 1 : i + 1 + PAIRS_AT_ONCE]
        a = a[: len(b)]
        for j in range(1, factor):
            mid = net(a, b, j / factor)[..., :H, :W]
            out[i : i + len(b), j - 1] = mid.float().clamp(0, 1).to(out.device)
    return out.flatten(0, 1)


def interleave(originals: np.ndarray, new: np.ndarray) -> np.ndarray:
    """originals (T, ...) and new ((T-1) * (k-1), ...) as `in_between` orders them -> ((T-1)*k + 1, ...) with the
    originals at 0, k, 2k, ..."""
    T = len(originals)
    k = len(new) // max(T - 1, 1) + 1
    new = new.reshape(T - 1, k - 1, *new.shape[1:])
    out = np.empty(((T - 1) * k + 1, *originals.shape[1:]), originals.dtype)
    out[::k] = originals
    for j in range(1, k):
        out[j::k] = new[:, j - 1]
    return out

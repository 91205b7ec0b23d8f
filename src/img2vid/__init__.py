"""img2vid: Stable Video Diffusion (SVD, SVD-XT, SVD-XT 1.1) in plain PyTorch.

import img2vid
pipe = img2vid.load("svd-xt")            # a preset, hub id, .safetensors file or diffusers folder
video = pipe.generate("photo.jpg", seed=23)
video.save("out.mp4")
"""

from .errors import Cancelled, CheckpointError, ImageError, Img2VidError, ParameterError
from .version import __version__ as __version__

__all__ = [
    "PRESETS",
    "Cancelled",
    "CheckpointError",
    "ImageError",
    "Img2VidError",
    "ModelConfig",
    "ParameterError",
    "Pipeline",
    "load",
]


def __getattr__(name: str):
    # torch is imported on first use, so `img2vid --help` and usage errors answer at once.
    if name in ("load", "Pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("PRESETS", "ModelConfig"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'img2vid' has no attribute {name!r}")

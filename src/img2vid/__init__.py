"""img2vid: Stable Video Diffusion (SVD, SVD-XT, SVD-XT 1.1) in plain PyTorch.

import img2vid
pipe = img2vid.load("svd-xt")            # a preset, hub id, .safetensors file or diffusers folder
video = pipe.generate("photo.jpg", seed=23)
video.save("out.mp4")
"""

__version__ = "0.1.0"  # before the imports: pipeline records it in every video

from .config import PRESETS, ModelConfig
from .errors import Cancelled, CheckpointError, ImageError, Img2VidError, ParameterError
from .pipeline import Pipeline, load

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

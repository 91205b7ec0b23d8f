"""The baseline for the time to the first video: a one-video diffusers script, run as a fresh process by
bench.py's first_video part.

    python benchmarks/diffusers_one_video.py FOLDER IMAGE OUT.mp4

FOLDER: a full-size SVD-XT StableVideoDiffusionPipeline folder (bench.py's setup part writes one with random
weights). 25 frames at 576x1024, 25 steps, fp16, decode chunk 8, written as an H.264 mp4 at 7 fps.
"""

import sys
import time

import av
import numpy as np
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

folder, image, out = sys.argv[1:4]
pipe = StableVideoDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16).to("cuda")
t = time.time()
frames = pipe(
    Image.open(image),
    height=576,
    width=1024,
    num_frames=25,
    num_inference_steps=25,
    decode_chunk_size=8,
    output_type="np",
    generator=torch.Generator("cuda").manual_seed(1),
).frames[0]
print("pipeline call", round(time.time() - t, 2), "s")
with av.open(out, "w") as c:
    s = c.add_stream("libx264", rate=7)
    s.width, s.height, s.pix_fmt = 1024, 576, "yuv420p"
    for f in (frames * 255).astype(np.uint8):
        c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    c.mux(s.encode())

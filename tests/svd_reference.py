"""Tiny diffusers SVD components with random weights: the implementation nobody here wrote, to compare with."""

from __future__ import annotations

from pathlib import Path

import torch

# The released diffusers configs of stabilityai/stable-video-diffusion-img2vid-xt (the fields img2vid reads): the
# loader tests write them into full-size folders, and benchmarks/bench.py builds diffusers' networks from them.
XT_DIFFUSERS_CONFIGS = {
    "unet": {
        "_class_name": "UNetSpatioTemporalConditionModel",
        "addition_time_embed_dim": 256,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
        "in_channels": 8,
        "layers_per_block": 2,
        "num_attention_heads": [5, 10, 20, 20],
        "num_frames": 25,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 768,
        "sample_size": 96,
        "transformer_layers_per_block": 1,
        "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
    },
    "vae": {
        "_class_name": "AutoencoderKLTemporalDecoder",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "out_channels": 3,
        "sample_size": 768,
        "scaling_factor": 0.18215,
    },
    "image_encoder": {
        "architectures": ["CLIPVisionModelWithProjection"],
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "image_size": 224,
        "intermediate_size": 5120,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
        "patch_size": 14,
        "projection_dim": 1024,
    },
}


TINY_UNET = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=(
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
    ),
    up_block_types=(
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    ),
    layers_per_block=2,
    num_attention_heads=(2, 4, 4),
    cross_attention_dim=32,
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=96,
    in_channels=8,
    out_channels=4,
    sample_size=32,
)
TINY_VAE = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)
TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_hidden_layers=2,
    image_size=224,
    patch_size=32,
    projection_dim=32,
    hidden_act="gelu",
)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every weight a non-trivial value: diffusers zero-initialises several output layers."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim == 1 and name.endswith("weight"):  # norm scales
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.ndim <= 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return module


def tiny_components(seed: int = 0):
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = randomize(UNetSpatioTemporalConditionModel(**TINY_UNET), seed).eval()
    vae = randomize(AutoencoderKLTemporalDecoder(**TINY_VAE), seed + 1).eval()
    enc = randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)), seed + 2).eval()
    return unet, vae, enc


def reference_pipeline(unet, vae, image_encoder):
    """diffusers' StableVideoDiffusionPipeline around the given modules, with the released scheduler and
    feature-extractor settings (those of stabilityai/stable-video-diffusion-img2vid-xt)."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor

    sched = EulerDiscreteScheduler(
        beta_end=0.012,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    fe = CLIPImageProcessor(
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
        size={"shortest_edge": 224},
    )
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=sched, feature_extractor=fe
    )


def tiny_pipeline(seed: int = 0):
    return reference_pipeline(*tiny_components(seed))


def save_tiny_folder(path: Path, seed: int = 0):
    pipe = tiny_pipeline(seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe

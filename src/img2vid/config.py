"""Network configs as plain dataclasses and the model presets as a dict.

The numbers of the full-size presets are those of the reference configs (generative-models
`configs/inference/svd*.yaml`); the single-file checkpoint keys they produce are listed in
`shared/reference/svd_xt_checkpoint_keys.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 8  # noisy latent (4) ++ conditioning latent (4)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: tuple[int, ...] = (5, 10, 20, 20)  # per level; the reference fixes the head dim at 64
    transformer_depth: int = 1
    context_dim: int = 1024  # one token: the CLIP image embedding
    vector_embed_dim: int = 256  # each of fps_id, motion_bucket_id, cond_aug -> 256-d sinusoid
    num_vector_values: int = 3
    video_kernel_size: int = 3  # temporal resblock kernel (3, 1, 1)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


@dataclass(frozen=True)
class VAEConfig:
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    scale_factor: float = 0.18215
    temporal_decoder: bool = True  # False: the plain per-frame decoder of the image-decoder variants
    video_kernel_size: int = 3
    norm_groups: int = 32  # GroupNorm groups (32 in every released model; fewer lets `tiny` be cheap)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class CLIPConfig:
    """The ViT image tower of OpenCLIP ViT-H/14 and its projection."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16  # OpenCLIP ViT-H-14: head width 80 (1280 / 80); the diffusers config says 16 too
    mlp_dim: int = 5120
    embed_dim: int = 1024  # projection output = UNet context_dim
    act: str = "gelu"  # "gelu" (OpenCLIP ViT-H) or "quick_gelu" (some transformers configs)
    eps: float = 1e-5
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class SamplingDefaults:
    """What the reference CLI uses for a version when the user says nothing."""

    num_frames: int = 25
    num_steps: int = 30
    min_cfg: float = 1.5
    max_cfg: float = 3.0
    fps_id: int = 6
    motion_bucket_id: int = 127
    cond_aug: float = 0.02
    decode_chunk_size: int = 14  # the reference decodes 14 frames at a time; this changes the video


@dataclass(frozen=True)
class ModelConfig:
    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    hub_id: str | None = None  # where the weights are published
    filename: str | None = None  # the official single file in that repo
    description: str = ""


_SVD = SamplingDefaults(num_frames=14, num_steps=25, min_cfg=1.0, max_cfg=2.5)
_XT = SamplingDefaults(num_frames=25, num_steps=30, min_cfg=1.5, max_cfg=3.0)
_IMAGE_DECODER = VAEConfig(temporal_decoder=False)

PRESETS: dict[str, ModelConfig] = {
    "svd": ModelConfig(
        "svd",
        defaults=_SVD,
        hub_id="stabilityai/stable-video-diffusion-img2vid",
        filename="svd.safetensors",
        description="SVD, 14 frames at 576x1024",
    ),
    "svd-xt": ModelConfig(
        "svd-xt",
        defaults=_XT,
        hub_id="stabilityai/stable-video-diffusion-img2vid-xt",
        filename="svd_xt.safetensors",
        description="SVD-XT, 25 frames at 576x1024",
    ),
    "svd-xt-1-1": ModelConfig(
        "svd-xt-1-1",
        defaults=_XT,
        hub_id="stabilityai/stable-video-diffusion-img2vid-xt-1-1",
        filename="svd_xt_1_1.safetensors",
        description="SVD-XT 1.1 (fine-tuned at fixed conditioning fps 6, motion 127), 25 frames",
    ),
    "svd-image-decoder": ModelConfig(
        "svd-image-decoder",
        vae=_IMAGE_DECODER,
        defaults=_SVD,
        hub_id="stabilityai/stable-video-diffusion-img2vid",
        filename="svd_image_decoder.safetensors",
        description="SVD with the per-frame image decoder, 14 frames",
    ),
    "svd-xt-image-decoder": ModelConfig(
        "svd-xt-image-decoder",
        vae=_IMAGE_DECODER,
        defaults=_XT,
        hub_id="stabilityai/stable-video-diffusion-img2vid-xt",
        filename="svd_xt_image_decoder.safetensors",
        description="SVD-XT with the per-frame image decoder, 25 frames",
    ),
    # Random weights, a few MB: for tests and smoke runs. Same code paths as the full model.
    "tiny": ModelConfig(
        "tiny",
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(True, True),
            num_heads=(2, 4),
            context_dim=32,
            vector_embed_dim=32,
        ),
        vae=VAEConfig(channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
        clip=CLIPConfig(image_size=224, patch_size=32, width=32, layers=2, heads=2, mlp_dim=64, embed_dim=32),
        defaults=SamplingDefaults(num_frames=4, num_steps=4, min_cfg=1.0, max_cfg=2.5, decode_chunk_size=4),
        description="random weights, a few MB, for tests and smoke runs",
    ),
}


def to_dict(cfg: ModelConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def from_dict(d: dict) -> ModelConfig:
    """Inverse of `to_dict` (lists become tuples again)."""

    def build(cls, values: dict):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    return ModelConfig(
        name=d["name"],
        unet=build(UNetConfig, d["unet"]),
        vae=build(VAEConfig, d["vae"]),
        clip=build(CLIPConfig, d["clip"]),
        defaults=build(SamplingDefaults, d["defaults"]),
        hub_id=d.get("hub_id"),
        filename=d.get("filename"),
        description=d.get("description", ""),
    )

"""Reading SVD weights: the official single-file .safetensors, a diffusers folder, or a hub id.

Everything goes through one path: a flat dict in the single-file naming (`SINGLE_FILE`). Diffusers folders are
renamed into it by declarative tables (`UNET_RESNET`, `VAE_TOP`, ...). Loading is strict: every missing,
unexpected or mis-shaped key is named in one `CheckpointError`; keys no video uses (`UNUSED`) are never read.
safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import PRESETS, CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from .config import from_dict as config_from_dict
from .config import to_dict as config_to_dict
from .errors import CheckpointError

log = logging.getLogger("img2vid")

# Where each part of img2vid's networks lives in the official single file: (our key prefix, file key prefix),
# first match wins. The conditioning frame is encoded with `conditioner.embedders.3.encoder` (a whole SD VAE:
# encoder, quant_conv, posterior mode), as the reference does; the video is decoded by `first_stage_model.decoder`.
SINGLE_FILE = {
    "unet": (("", "model.diffusion_model."),),
    "vae": (
        ("decoder.", "first_stage_model.decoder."),
        ("encoder.", "conditioner.embedders.3.encoder.encoder."),
        ("quant_conv.", "conditioner.embedders.3.encoder.quant_conv."),
    ),
    "image_encoder": (("", "conditioner.embedders.0.open_clip.model.visual."),),
}
# Keys of the official files that no part of image-to-video uses: never read. `first_stage_model.encoder` is the
# first stage's own encoder, which the reference never runs to make a video; embedders.3's decoder and
# post_quant_conv are the unused half of its SD VAE; the rest is OpenCLIP's text tower.
_UNUSED_TEXT = (
    "positional_embedding",
    "text_projection",
    "logit_scale",
    "token_embedding.weight",
    "ln_final.",
)
UNUSED = re.compile(
    r"^first_stage_model\.encoder\."
    r"|^conditioner\.embedders\.3\.encoder\.(decoder|post_quant_conv)\."
    r"|^conditioner\.embedders\.0\.open_clip\.model\.(" + "|".join(re.escape(k) for k in _UNUSED_TEXT) + ")"
)


def file_key(comp: str, key: str) -> str:
    """A key of one of img2vid's networks ("unet", "vae", "image_encoder") -> its name in the single file."""
    for ours, theirs in SINGLE_FILE[comp]:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(f"{comp}.{key} has no place in the single-file layout")


CONFIG_METADATA = "img2vid_config"  # safetensors metadata key of files that carry their own network sizes
REFUSED_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}


@dataclass
class Weights:
    """A checkpoint resolved to a config and a lazy source of tensors in single-file naming."""

    config: ModelConfig
    shapes: dict[str, tuple[int, ...] | None]  # key -> shape; None where known only once read (diffusers)
    read: Callable[[str, torch.device], torch.Tensor]  # key, device -> tensor (dtype as stored)
    description: str


# --------------------------------------------------------------------------------------------------------------
# Single file


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in REFUSED_SUFFIXES:
        raise CheckpointError(
            f"{path}: {path.suffix} files are pickles, which can run arbitrary code when loaded; img2vid only "
            "reads .safetensors. Download the .safetensors version of these weights instead."
        )


def _open_safetensors(path: Path, device: str = "cpu"):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None


def read_single_file(path: str | os.PathLike, variant: str | None = None) -> Weights:
    path = Path(path)
    _refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file")
    handle = _open_safetensors(path)
    shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    meta = handle.metadata() or {}
    name, why = detect_variant(shapes, path.name)
    if variant is not None:
        name, why = variant, "as asked"
    if CONFIG_METADATA in meta:  # written by diffusers_to_single_file: the sizes travel with the weights
        cfg = config_from_dict(json.loads(meta[CONFIG_METADATA]))
        cfg = replace(cfg, name=variant or cfg.name)
        name, why = cfg.name, "network sizes from the file's metadata"
    else:
        cfg = _preset_for(name)
    log.info("%s: loading as %s (%s)", path.name, name, why)

    handles = {"cpu": handle}

    def read(key: str, device: torch.device) -> torch.Tensor:
        # safetensors places each tensor on the device itself: no CPU copy of the model is ever built.
        dev = str(device)
        if dev not in handles:
            handles[dev] = _open_safetensors(path, dev)
        return handles[dev].get_tensor(key)

    return Weights(cfg, shapes, read, f"{path.name} as {name} ({why})")


def detect_variant(keys: dict, filename: str = "") -> tuple[str, str]:
    """Which preset a single file is: the keys tell temporal vs image decoder; only the name tells SVD vs XT."""
    temporal = "first_stage_model.decoder.conv_out.time_mix_conv.weight" in keys
    stem = filename.lower()
    if "xt_1_1" in stem or "xt-1-1" in stem:
        base = "svd-xt-1-1"
    elif "xt" in stem:
        base = "svd-xt"
    else:
        base = "svd"
    decoder = "temporal decoder" if temporal else "no temporal decoder keys: per-frame image decoder"
    if not temporal:
        base = "svd-xt-image-decoder" if base.startswith("svd-xt") else "svd-image-decoder"
    basis = "file name" if stem else "default"
    return base, f"{decoder}; SVD vs SVD-XT from the {basis}, pass variant= to override"


def _preset_for(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise CheckpointError(f"unknown variant {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------------------------------------------
# Diffusers folder: configs -> our dataclasses, names -> single-file names through one table

# Per-module renames (diffusers suffix -> ours). `@T` transposes, `@1x1` turns a Linear into a 1x1 conv.
UNET_RESNET = {
    "spatial_res_block.norm1": "in_layers.0",
    "spatial_res_block.conv1": "in_layers.2",
    "spatial_res_block.time_emb_proj": "emb_layers.1",
    "spatial_res_block.norm2": "out_layers.0",
    "spatial_res_block.conv2": "out_layers.3",
    "spatial_res_block.conv_shortcut": "skip_connection",
    "temporal_res_block.norm1": "time_stack.in_layers.0",
    "temporal_res_block.conv1": "time_stack.in_layers.2",
    "temporal_res_block.time_emb_proj": "time_stack.emb_layers.1",
    "temporal_res_block.norm2": "time_stack.out_layers.0",
    "temporal_res_block.conv2": "time_stack.out_layers.3",
    "time_mixer.mix_factor": "time_mixer.mix_factor",
}
UNET_TRANSFORMER = {
    "norm": "norm",
    "proj_in": "proj_in",
    "proj_out": "proj_out",
    "transformer_blocks": "transformer_blocks",
    "temporal_transformer_blocks": "time_stack",
    "time_pos_embed.linear_1": "time_pos_embed.0",
    "time_pos_embed.linear_2": "time_pos_embed.2",
    "time_mixer.mix_factor": "time_mixer.mix_factor",
}
UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
    "spatial_res_block.norm1": "norm1",
    "spatial_res_block.conv1": "conv1",
    "spatial_res_block.norm2": "norm2",
    "spatial_res_block.conv2": "conv2",
    "spatial_res_block.conv_shortcut": "nin_shortcut",
    "temporal_res_block.norm1": "time_stack.in_layers.0",
    "temporal_res_block.conv1": "time_stack.in_layers.2",
    "temporal_res_block.norm2": "time_stack.out_layers.0",
    "temporal_res_block.conv2": "time_stack.out_layers.3",
    "time_mixer.mix_factor": "mix_factor",
}
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q@1x1",
    "to_k": "k@1x1",
    "to_v": "v@1x1",
    "to_out.0": "proj_out@1x1",
}
VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "quant_conv": "quant_conv",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.time_conv_out": "decoder.conv_out.time_mix_conv",
}
CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
    # q, k and v are concatenated into nn.MultiheadAttention's in_proj (see _clip_rules)
}
CLIP_TOP = {
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding": "conv1",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm": "ln_pre",
    "vision_model.post_layernorm": "ln_post",
    "visual_projection.weight": "proj@T",
}
DIFFUSERS_IGNORED = re.compile(r"^vision_model\.embeddings\.position_ids$")


def _unet_prefixes(cfg: UNetConfig) -> dict[str, tuple[str, dict]]:
    """diffusers module prefix -> (our module prefix, rename table), enumerating the UNet's blocks."""
    out: dict[str, tuple[str, dict]] = {"": ("", UNET_TOP)}
    per_level = cfg.num_res_blocks + 1
    n = len(cfg.channel_mult)
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            idx = 1 + i * per_level + j
            out[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{idx}.0.", UNET_RESNET)
            out[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{idx}.1.", UNET_TRANSFORMER)
        out[f"down_blocks.{i}.downsamplers.0."] = (
            f"input_blocks.{1 + i * per_level + cfg.num_res_blocks}.0.",
            {"conv": "op"},
        )
    out["mid_block.resnets.0."] = ("middle_block.0.", UNET_RESNET)
    out["mid_block.attentions.0."] = ("middle_block.1.", UNET_TRANSFORMER)
    out["mid_block.resnets.1."] = ("middle_block.2.", UNET_RESNET)
    for i in range(n):
        level = n - 1 - i
        for j in range(per_level):
            out[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{i * per_level + j}.0.", UNET_RESNET)
            out[f"up_blocks.{i}.attentions.{j}."] = (
                f"output_blocks.{i * per_level + j}.1.",
                UNET_TRANSFORMER,
            )
        up_pos = 2 if cfg.attention_levels[level] else 1
        out[f"up_blocks.{i}.upsamplers.0."] = (
            f"output_blocks.{i * per_level + per_level - 1}.{up_pos}.",
            {"conv": "conv"},
        )
    return out


def _vae_prefixes(cfg: VAEConfig) -> dict[str, tuple[str, dict]]:
    n = len(cfg.channel_mult)
    out: dict[str, tuple[str, dict]] = {"": ("", VAE_TOP)}
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            out[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", VAE_RESNET)
        out[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", {"conv": "conv"})
        for j in range(cfg.num_res_blocks + 1):  # diffusers lists decoder levels low resolution first
            out[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{n - 1 - i}.block.{j}.", VAE_RESNET)
        out[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{n - 1 - i}.upsample.", {"conv": "conv"})
    for part in ("encoder", "decoder"):
        out[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", VAE_RESNET)
        out[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", VAE_RESNET)
        out[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION)
    return out


def _clip_prefixes(cfg: CLIPConfig) -> dict[str, tuple[str, dict]]:
    out: dict[str, tuple[str, dict]] = {"": ("", CLIP_TOP)}
    for i in range(cfg.layers):
        out[f"vision_model.encoder.layers.{i}."] = (f"transformer.resblocks.{i}.", CLIP_LAYER)
    return out


def _rename(key: str, prefixes: dict[str, tuple[str, dict]]) -> tuple[str, str] | None:
    """diffusers key -> (our key, transform) by the longest matching module prefix and table entry."""
    best = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if best is None:
        return None
    ours, table = prefixes[best]
    rest = key[len(best) :]
    for src in sorted(table, key=len, reverse=True):
        if rest == src or rest.startswith(src + "."):
            dst, _, op = table[src].partition("@")
            return ours + dst + rest[len(src) :], op
    return None


def _convert(comp: str, tensors: dict[str, Callable[[], torch.Tensor]], cfg: ModelConfig) -> Iterator:
    """Yield (single-file key, loader) for one diffusers component; unknown keys raise at the end."""
    prefixes = {
        "unet": _unet_prefixes(cfg.unet),
        "vae": _vae_prefixes(cfg.vae),
        "image_encoder": _clip_prefixes(cfg.clip),
    }[comp]
    unknown = []
    qkv: dict[str, dict[str, Callable]] = {}
    for key, get in tensors.items():
        if DIFFUSERS_IGNORED.match(key):
            continue
        m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if comp == "image_encoder" and m:
            qkv.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = get
            continue
        renamed = _rename(key, prefixes)
        if renamed is None:
            unknown.append(key)
            continue
        ours, op = renamed
        yield file_key(comp, ours), _transform(get, op)
    for ours, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown.append(f"{ours} (has only {sorted(parts)} of q, k, v)")
            continue
        yield file_key(comp, ours), (lambda p=parts: torch.cat([p["q"](), p["k"](), p["v"]()]))
    if unknown:
        raise CheckpointError(f"{comp}: keys with no place in img2vid's model: {', '.join(sorted(unknown))}")


def _transform(get: Callable[[], torch.Tensor], op: str) -> Callable[[], torch.Tensor]:
    if op == "T":
        return lambda: get().t().contiguous()
    if op == "1x1":
        return lambda: (lambda t: t[:, :, None, None] if t.ndim == 2 else t)(get())
    return get


def _config_from_diffusers(folder: Path, name: str) -> ModelConfig:
    def cfg_json(sub: str) -> dict:
        p = folder / sub / "config.json"
        if not p.is_file():
            raise CheckpointError(
                f"{folder}: missing {sub}/config.json (not a complete diffusers SVD folder)"
            )
        return json.loads(p.read_text())

    unet = _unet_config(cfg_json("unet"), folder)
    vae = _vae_config(cfg_json("vae"))
    clip = _clip_config(cfg_json("image_encoder"), folder)
    defaults = PRESETS[name].defaults if name in PRESETS else PRESETS["svd-xt"].defaults
    return replace(
        PRESETS.get(name, PRESETS["svd-xt"]), name=name, unet=unet, vae=vae, clip=clip, defaults=defaults
    )


def _unet_config(u: dict, folder: Path) -> UNetConfig:
    if u.get("_class_name", "UNetSpatioTemporalConditionModel") != "UNetSpatioTemporalConditionModel":
        raise CheckpointError(
            f"{folder}/unet is a {u['_class_name']}, not SVD's UNetSpatioTemporalConditionModel"
        )
    blocks = tuple(u.get("block_out_channels", (320, 640, 1280, 1280)))
    base = blocks[0]
    heads = u.get("num_attention_heads", (5, 10, 20, 20))
    heads = tuple(heads) if isinstance(heads, list | tuple) else (heads,) * len(blocks)
    layers = u.get("layers_per_block", 2)
    if not isinstance(layers, int) or isinstance(u.get("transformer_layers_per_block", 1), list | tuple):
        raise CheckpointError(f"{folder}/unet: per-block layer counts are not supported")
    down_types = u.get(
        "down_block_types", ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"]
    )
    if any(b % base for b in blocks):
        raise CheckpointError(f"{folder}/unet: block_out_channels {blocks} are not multiples of the first")
    return UNetConfig(
        in_channels=u.get("in_channels", 8),
        out_channels=u.get("out_channels", 4),
        model_channels=base,
        channel_mult=tuple(b // base for b in blocks),
        num_res_blocks=layers,
        attention_levels=tuple(t.startswith("CrossAttn") for t in down_types),
        num_heads=heads,
        transformer_depth=u.get("transformer_layers_per_block", 1),
        context_dim=u.get("cross_attention_dim", 1024),
        vector_embed_dim=u.get("addition_time_embed_dim", 256),
        num_vector_values=u.get("projection_class_embeddings_input_dim", 768)
        // u.get("addition_time_embed_dim", 256),
    )


def _vae_config(v: dict) -> VAEConfig:
    vb = tuple(v.get("block_out_channels", (128, 256, 512, 512)))
    return VAEConfig(
        channels=vb[0],
        channel_mult=tuple(b // vb[0] for b in vb),
        num_res_blocks=v.get("layers_per_block", 1),
        latent_channels=v.get("latent_channels", 4),
        scale_factor=v.get("scaling_factor", 0.18215),
        temporal_decoder=v.get("_class_name", "AutoencoderKLTemporalDecoder")
        == "AutoencoderKLTemporalDecoder",
    )


def _clip_config(c: dict, folder: Path) -> CLIPConfig:
    act = c.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu"):
        raise CheckpointError(f"{folder}/image_encoder: activation {act!r} is not supported")
    return CLIPConfig(
        image_size=c.get("image_size", 224),
        patch_size=c.get("patch_size", 32),
        width=c.get("hidden_size", 768),
        layers=c.get("num_hidden_layers", 12),
        heads=c.get("num_attention_heads", 12),
        mlp_dim=c.get("intermediate_size", 3072),
        embed_dim=c.get("projection_dim", 512),
        act=act,
        eps=c.get("layer_norm_eps", 1e-5),
    )


def _component_files(folder: Path, sub: str) -> list[Path]:
    d = folder / sub
    for stem in ("diffusion_pytorch_model", "model"):
        for variant in ("", ".fp16"):
            single = d / f"{stem}{variant}.safetensors"
            if single.is_file():
                return [single]
            index = d / f"{stem}{variant}.safetensors.index.json"
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                return [d / s for s in shards]
    pickles = [p.name for p in d.glob("*") if p.suffix in REFUSED_SUFFIXES]
    hint = f" (found only {', '.join(pickles)}: pickles are never loaded)" if pickles else ""
    raise CheckpointError(f"{d}: no .safetensors weights{hint}")


def read_diffusers_folder(folder: str | os.PathLike, variant: str | None = None) -> Weights:
    folder = Path(folder)
    name = variant or _guess_name(folder)
    cfg = _config_from_diffusers(folder, name)
    shapes: dict[str, tuple[int, ...] | None] = {}
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    for comp, sub in (("unet", "unet"), ("vae", "vae"), ("image_encoder", "image_encoder")):
        getters: dict[str, Callable[[], torch.Tensor]] = {}
        for f in _component_files(folder, sub):
            h = _open_safetensors(f)
            getters.update({k: (lambda h=h, k=k: h.get_tensor(k)) for k in h.keys()})
        for ours, get in _convert(comp, getters, cfg):
            loaders[ours] = get
            shapes[ours] = None  # renamed tensors may change shape (1x1, transpose, q/k/v): checked once read
    log.info("%s: diffusers folder, loading as %s", folder, name)

    def read(key: str, device: torch.device) -> torch.Tensor:
        return loaders[key]().to(device)

    return Weights(cfg, shapes, read, f"diffusers folder {folder.name} as {name}")


def diffusers_to_single_file(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a diffusers SVD folder as one .safetensors in the official single-file naming (through the key
    table), with the network sizes in its metadata so that non-standard sizes load back too."""
    from safetensors.torch import save_file

    w = read_diffusers_folder(folder)
    cpu = torch.device("cpu")
    tensors = {k: w.read(k, cpu).contiguous() for k in w.shapes}
    out = Path(out)
    save_file(tensors, str(out), metadata={CONFIG_METADATA: json.dumps(config_to_dict(w.config))})
    return out


def _guess_name(folder: Path) -> str:
    n = folder.name.lower()
    if "xt-1-1" in n or "xt_1_1" in n:
        return "svd-xt-1-1"
    return "svd-xt" if "xt" in n else "svd"


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()
    )


# --------------------------------------------------------------------------------------------------------------
# Hub


def _reachable(url: str, seconds: float = 3.0) -> bool:
    """Whether a TCP connection to the host of `url` opens within `seconds` (always True behind a proxy)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(k) for k in proxies):
        return True  # only the proxy knows the way: let huggingface_hub try
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    connected = threading.Event()

    def connect():  # on a thread, so that a DNS lookup that hangs is bounded too
        try:
            socket.create_connection((parts.hostname, port), timeout=seconds).close()
            connected.set()
        except (OSError, ValueError):
            pass

    threading.Thread(target=connect, daemon=True).start()
    return connected.wait(seconds)


def hub_resolve(repo_id: str, filename: str | None) -> Path:
    """Download (or find in the huggingface_hub cache) a single file, or the diffusers parts of a repo.

    When the hub cannot be reached (a TCP connection to it fails within 3 s) only the cache is read, so
    an offline machine gets the answer at once instead of after huggingface_hub's retries (~30 s)."""
    try:
        import huggingface_hub as hf
        from huggingface_hub import constants
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError(
            f"huggingface_hub is needed to fetch {repo_id}: pip install huggingface_hub"
        ) from e

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    cache_only = offline or not _reachable(constants.ENDPOINT)
    try:
        if filename:
            return Path(hf.hf_hub_download(repo_id, filename, local_files_only=cache_only))
        patterns = ["model_index.json", "*/config.json", "unet/*.safetensors*", "vae/*.safetensors*"]
        patterns.append("image_encoder/*.safetensors*")
        return Path(hf.snapshot_download(repo_id, allow_patterns=patterns, local_files_only=cache_only))
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id}, then log in "
            "(`hf auth login`) or set HF_TOKEN."
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: no such repository on the hub (or it is private: set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        what = f"{repo_id}/{filename}" if filename else repo_id
        hint = (
            "HF_HUB_OFFLINE is set; unset it to download, or fetch it on a connected machine with "
            f"`hf download {repo_id}{' ' + filename if filename else ''}`"
            if offline
            else f"the hub ({constants.ENDPOINT}) could not be reached; check the connection, or pass a local "
            ".safetensors file or folder"
        )
        raise CheckpointError(f"{what} is not in the local huggingface_hub cache and {hint}") from None
    except OSError as e:
        raise CheckpointError(f"could not fetch {repo_id}: {e}") from None


def cached_path(repo_id: str, filename: str) -> Path | None:
    """The cached file if the huggingface_hub cache has it (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(repo_id, filename)
        return Path(p) if isinstance(p, str) else None
    except Exception:
        return None


def resolve(source: str | os.PathLike, variant: str | None = None) -> Weights | ModelConfig:
    """A preset name, a path (.safetensors or diffusers folder), or a hub id -> Weights (or a random preset)."""
    s = str(source)
    if s in PRESETS:
        cfg = PRESETS[s]
        if cfg.hub_id is None:
            return cfg  # random weights
        path = hub_resolve(cfg.hub_id, cfg.filename)
        return read_single_file(path, variant or s)
    path = Path(s).expanduser()
    if path.exists():
        if path.is_dir():
            if not is_diffusers_folder(path):
                raise CheckpointError(
                    f"{path}: a folder, but not a diffusers SVD folder (no model_index.json)"
                )
            return read_diffusers_folder(path, variant)
        return read_single_file(path, variant)
    _refuse_pickle(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", s) and not s.endswith(".safetensors"):
        known = next((c for c in PRESETS.values() if c.hub_id == s), None)
        if known is not None:
            return read_single_file(hub_resolve(s, known.filename), variant or known.name)
        return read_diffusers_folder(hub_resolve(s, None), variant)
    raise CheckpointError(
        f"{s!r} is not a preset ({', '.join(PRESETS)}), an existing .safetensors file or diffusers folder, "
        "or a hub id like stabilityai/stable-video-diffusion-img2vid-xt"
    )


# --------------------------------------------------------------------------------------------------------------
# Strict loading into the networks


def key_problems(expected: dict[str, tuple], present: dict[str, tuple | None]) -> list[str]:
    """Every missing, unexpected and mis-shaped key of a file (`present`, shapes None where unknown) against a
    network (`expected`), each kind in one line naming up to 20."""

    def listed(keys: list[str]) -> str:
        return f"{len(keys)} key(s): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"

    missing = sorted(expected.keys() - present.keys())
    unexpected = sorted(present.keys() - expected.keys())
    bad_shapes = [
        f"{k}: file {present[k]}, model {expected[k]}"
        for k in sorted(present.keys() & expected.keys())
        if present[k] is not None and tuple(present[k]) != tuple(expected[k])
    ]
    problems = [f"missing {listed(missing)}"] if missing else []
    problems += [f"unexpected {listed(unexpected)}"] if unexpected else []
    return problems + ([f"shape mismatch: {'; '.join(bad_shapes[:20])}"] if bad_shapes else [])


def load_into(
    nets: dict[str, torch.nn.Module], weights: Weights, device: torch.device, dtype: torch.dtype
) -> None:
    """Check every key and shape, then read tensors straight to `device`, cast there, and assign them."""
    expected = {
        file_key(c, k): (c, k, tuple(t.shape)) for c, net in nets.items() for k, t in net.state_dict().items()
    }
    shapes = {k: v for k, v in weights.shapes.items() if k in expected or not UNUSED.match(k)}
    problems = key_problems({k: v[2] for k, v in expected.items()}, shapes)
    if problems:
        raise CheckpointError(
            f"{weights.description}: checkpoint does not match the {weights.config.name} network: "
            + " | ".join(problems)
        )

    if device.type == "meta":  # a dry run: keys and shapes checked, nothing read
        for net in nets.values():
            net.to(dtype)
        return

    state: dict[str, dict[str, torch.Tensor]] = {c: {} for c in nets}
    for full, (comp, key, shape) in expected.items():
        # one tensor at a time, cast on arrival: no full-precision copy of the model
        t = weights.read(full, device)
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{weights.description}: shape mismatch: {full}: file {tuple(t.shape)}, model {shape}"
            )
        state[comp][key] = t.to(dtype) if t.is_floating_point() else t
    for comp, net in nets.items():
        net.load_state_dict(state[comp], strict=True, assign=True)

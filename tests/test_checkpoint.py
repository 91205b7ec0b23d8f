"""The loader: official single-file layout at full size (header-only files), strictness, diffusers round trip."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from svd_reference import XT_DIFFUSERS_CONFIGS, save_tiny_folder

import img2vid
from img2vid import checkpoint
from img2vid.errors import CheckpointError

# Every key and shape of the released svd_xt.safetensors and of the diffusers folder (copied from the team's
# shared/reference so that the tests run wherever the checkout is).
DATA = Path(__file__).resolve().parent / "data"
REFERENCE = DATA / "svd_xt_checkpoint_keys.json"
DIFFUSERS_REFERENCE = DATA / "svd_xt_diffusers_keys.json"
FULL_PARAMS = {"unet": 1_524_623_082, "vae": 97_742_847, "image_encoder": 632_076_800}
TEMPORAL_DECODER = ("time_stack", "mix_factor", "time_mix_conv")


def reference_keys() -> dict[str, list[int]]:
    return {k: shape for k, (shape, _dtype) in json.loads(REFERENCE.read_text()).items()}


def write_sparse_safetensors(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A valid fp16 .safetensors with every key and shape whose data is a hole in a sparse file: instant to write,
    reads back as zeros, takes no disk. Loading it exercises the real reader on the real layout."""
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[k] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def count(pipe) -> dict[str, int]:
    nets = {"unet": pipe.unet, "vae": pipe.vae, "image_encoder": pipe.image_encoder}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}


def test_official_single_file_layout_loads_strictly(tmp_path):
    path = write_sparse_safetensors(tmp_path / "svd_xt.safetensors", reference_keys())
    pipe = img2vid.load(path, device="cpu", dtype=torch.float16)
    assert pipe.name == "svd-xt"
    assert count(pipe) == FULL_PARAMS
    assert all(p.device.type == "cpu" and p.dtype == torch.float16 for p in pipe.unet.parameters())
    assert "temporal decoder" in pipe.source


def test_image_decoder_variant_is_recognised(tmp_path):
    keys = {
        k: s
        for k, s in reference_keys().items()
        if not (k.startswith("first_stage_model.decoder") and any(t in k for t in TEMPORAL_DECODER))
    }
    name, why = checkpoint.detect_variant(keys, "svd_xt_image_decoder.safetensors")
    assert name == "svd-xt-image-decoder" and "image decoder" in why
    assert checkpoint.detect_variant(keys, "svd_image_decoder.safetensors")[0] == "svd-image-decoder"
    assert checkpoint.detect_variant(reference_keys(), "svd.safetensors")[0] == "svd"
    assert checkpoint.detect_variant(reference_keys(), "svd_xt_1_1.safetensors")[0] == "svd-xt-1-1"
    path = write_sparse_safetensors(tmp_path / "svd_xt_image_decoder.safetensors", keys)
    pipe = img2vid.load(path, device="meta")
    assert pipe.name == "svd-xt-image-decoder" and not pipe.config.vae.temporal_decoder


def test_missing_key_is_named(tmp_path):
    keys = reference_keys()
    gone = "model.diffusion_model.output_blocks.5.2.conv.weight"
    del keys[gone]
    path = write_sparse_safetensors(tmp_path / "svd_xt.safetensors", keys)
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): " + gone.replace(".", r"\.")):
        img2vid.load(path, device="cpu")


def test_extra_key_is_named(tmp_path):
    keys = reference_keys()
    keys["model.diffusion_model.input_blocks.1.1.surprise.weight"] = [3]
    path = write_sparse_safetensors(tmp_path / "svd_xt.safetensors", keys)
    with pytest.raises(
        CheckpointError, match=r"unexpected 1 key\(s\): model\.diffusion_model\.input_blocks\.1\.1\.surprise"
    ):
        img2vid.load(path, device="cpu")


def test_shape_mismatch_is_named(tmp_path):
    keys = reference_keys()
    keys["first_stage_model.decoder.conv_in.weight"] = [512, 4, 1, 1]
    path = write_sparse_safetensors(tmp_path / "svd_xt.safetensors", keys)
    with pytest.raises(
        CheckpointError, match=r"first_stage_model\.decoder\.conv_in\.weight: file \(512, 4, 1, 1\)"
    ):
        img2vid.load(path, device="cpu")


def test_unused_reference_keys_are_skipped_but_nothing_else():
    assert checkpoint.UNUSED.match("first_stage_model.encoder.conv_in.weight")
    assert checkpoint.UNUSED.match("conditioner.embedders.3.encoder.decoder.conv_in.weight")
    assert checkpoint.UNUSED.match("conditioner.embedders.3.encoder.post_quant_conv.weight")
    assert checkpoint.UNUSED.match("conditioner.embedders.0.open_clip.model.token_embedding.weight")
    assert not checkpoint.UNUSED.match("conditioner.embedders.3.encoder.encoder.conv_in.weight")
    assert not checkpoint.UNUSED.match("conditioner.embedders.3.encoder.quant_conv.weight")
    assert not checkpoint.UNUSED.match("first_stage_model.decoder.conv_in.weight")
    assert not checkpoint.UNUSED.match("conditioner.embedders.0.open_clip.model.visual.proj")
    assert not checkpoint.UNUSED.match("model.diffusion_model.out.2.weight")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickles_are_refused(tmp_path, suffix):
    path = tmp_path / f"svd{suffix}"
    path.write_bytes(b"not looked at")
    with pytest.raises(CheckpointError, match="pickle"):
        img2vid.load(path, device="cpu")


def test_not_safetensors_content(tmp_path):
    path = tmp_path / "svd.safetensors"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        img2vid.load(path, device="cpu")


def test_unknown_source_says_what_is_accepted():
    with pytest.raises(CheckpointError, match="not a preset"):
        img2vid.load("no-such-thing", device="cpu")


def test_hub_offline_and_not_cached_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="not in the local huggingface_hub cache.*HF_HUB_OFFLINE"):
        img2vid.load("stabilityai/stable-video-diffusion-img2vid-xt", device="cpu")


def test_hub_id_from_cache(monkeypatch, tmp_path):
    """A hub id whose file is already in the huggingface_hub cache loads offline."""
    import huggingface_hub.constants as c

    snap = tmp_path / "models--stabilityai--stable-video-diffusion-img2vid-xt"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    target = snap / "snapshots" / ("0" * 40)
    target.mkdir(parents=True)
    write_sparse_safetensors(target / "svd_xt.safetensors", reference_keys())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    pipe = img2vid.load("stabilityai/stable-video-diffusion-img2vid-xt", device="meta")
    assert pipe.name == "svd-xt" and count(pipe) == FULL_PARAMS


def test_single_file_from_diffusers_folder_loads_the_same(tmp_path):
    pytest.importorskip("diffusers")

    folder = tmp_path / "tiny-svd-xt"
    save_tiny_folder(folder)
    single = checkpoint.diffusers_to_single_file(folder, tmp_path / "tiny_svd_xt.safetensors")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        keys = set(f.keys())
    # where the official file keeps the conditioning encoder
    assert "conditioner.embedders.3.encoder.quant_conv.weight" in keys
    assert "conditioner.embedders.3.encoder.encoder.conv_in.weight" in keys
    assert not any(k.startswith("first_stage_model.encoder.") for k in keys)
    a = img2vid.load(folder, device="cpu")
    b = img2vid.load(single, device="cpu")  # the tiny sizes travel in the file's metadata
    assert b.config.unet == a.config.unet and b.config.vae == a.config.vae and b.config.clip == a.config.clip
    for net_a, net_b in ((a.unet, b.unet), (a.vae, b.vae), (a.image_encoder, b.image_encoder)):
        sa, sb = net_a.state_dict(), net_b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(a.vae.encode(x), b.vae.encode(x), rtol=0, atol=0)


def write_sparse_diffusers_folder(folder: Path) -> Path:
    keys = json.loads(DIFFUSERS_REFERENCE.read_text())
    (folder / "model_index.json").parent.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    for comp, cfg in XT_DIFFUSERS_CONFIGS.items():
        (folder / comp).mkdir()
        (folder / comp / "config.json").write_text(json.dumps(cfg))
        stem = "model" if comp == "image_encoder" else "diffusion_pytorch_model"
        write_sparse_safetensors(folder / comp / f"{stem}.fp16.safetensors", keys[comp])
    return folder


def test_official_diffusers_folder_layout_loads_strictly(tmp_path):
    """Every key and shape of the released diffusers folder has its place, at full size."""
    folder = write_sparse_diffusers_folder(tmp_path / "stable-video-diffusion-img2vid-xt")
    pipe = img2vid.load(folder, device="meta")
    assert pipe.name == "svd-xt"
    assert count(pipe) == FULL_PARAMS
    assert pipe.config.unet == img2vid.config.PRESETS["svd-xt"].unet
    assert pipe.config.vae == img2vid.config.PRESETS["svd-xt"].vae
    assert pipe.config.clip == img2vid.config.PRESETS["svd-xt"].clip


def reference_layout_file(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A single file in the reference's key layout at the tiny preset's sizes, every tensor random: both VAE
    encoders (embedders.3's and the first stage's) and quant_conv hold different values, embedders.3's unused
    SD decoder and post_quant_conv are there, and so are the text tower's leftovers."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from img2vid.config import PRESETS
    from img2vid.models import VAE, build, init_random

    cfg = PRESETS["tiny"]
    nets = build(cfg, "cpu")
    tensors = {}
    for i, (comp, net) in enumerate(nets.items()):
        init_random(net, seed=10 + i, std=0.2)
        tensors.update({checkpoint.file_key(comp, k): v for k, v in net.state_dict().items()})
    # The first stage's own encoder and embedders.3's decoder half: in the file, never used for a video.
    other = init_random(VAE(replace(cfg.vae, temporal_decoder=False)), seed=20, std=0.2)
    for k, v in other.state_dict().items():
        if k.startswith("encoder."):
            tensors["first_stage_model." + k] = v
        elif k.startswith("decoder."):
            tensors["conditioner.embedders.3.encoder." + k] = v
    tensors["conditioner.embedders.3.encoder.post_quant_conv.weight"] = torch.randn(4, 4, 1, 1)
    tensors["conditioner.embedders.3.encoder.post_quant_conv.bias"] = torch.randn(4)
    tensors["conditioner.embedders.0.open_clip.model.logit_scale"] = torch.ones(())
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path))
    return path, tensors


def test_conditioning_latent_comes_from_the_reference_encoder(tmp_path):
    """encode_image runs conditioner.embedders.3.encoder (encoder, quant_conv, posterior mode) exactly as diffusers'
    own LDM converter reads those tensors into its AutoencoderKL, and not first_stage_model.encoder."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path, tensors = reference_layout_file(tmp_path / "svd_xt.safetensors")
    pipe = img2vid.load(path, device="cpu", dtype=torch.float32, variant="tiny")
    vae = pipe.config.vae
    config = {
        "block_out_channels": [vae.channels * m for m in vae.channel_mult],
        "down_block_types": ["DownEncoderBlock2D"] * len(vae.channel_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(vae.channel_mult),
        "layers_per_block": vae.num_res_blocks,
        "latent_channels": vae.latent_channels,
        "norm_num_groups": vae.norm_groups,
    }

    def diffusers_vae(encoder: str) -> AutoencoderKL:
        """AutoencoderKL from embedders.3's tensors alone, or with the encoder under `encoder` put in."""
        sd_vae = "conditioner.embedders.3.encoder."
        ldm = {k[len(sd_vae) :]: v for k, v in tensors.items() if k.startswith(sd_vae)}
        ldm.update({"encoder." + k[len(encoder) :]: v for k, v in tensors.items() if k.startswith(encoder)})
        ref = AutoencoderKL(**config).eval()
        ref.load_state_dict(convert_ldm_vae_checkpoint(ldm, config), strict=True)
        return ref

    reference = diffusers_vae("conditioner.embedders.3.encoder.encoder.")
    first_stage = diffusers_vae("first_stage_model.encoder.")
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    ours = pipe.encode_image(x)
    assert ours.shape == (2, 4, 8, 12) and ours.dtype == torch.float32
    with torch.no_grad():
        want = reference.encode(x).latent_dist.mode()
        other = first_stage.encode(x).latent_dist.mode()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(ours, want) <= 1e-4
    assert rel(ours, other) > 0.1  # the first stage's encoder would give another latent


def test_keys_no_video_uses_are_never_read(tmp_path):
    path, tensors = reference_layout_file(tmp_path / "svd_xt.safetensors")
    weights = checkpoint.read_single_file(path, variant="tiny")
    read = []
    inner = weights.read
    weights.read = lambda key, device: read.append(key) or inner(key, device)
    from img2vid.models import build

    checkpoint.load_into(build(weights.config, "meta"), weights, torch.device("cpu"), torch.float32)
    unused = {k for k in tensors if checkpoint.UNUSED.match(k)}
    assert unused and set(read) == set(tensors) - unused


HUB_SCRIPT = """
import json, sys, time
from img2vid import checkpoint
from img2vid.errors import CheckpointError
t0 = time.monotonic()
try:
    checkpoint.hub_resolve(sys.argv[1], sys.argv[2] or None)
except CheckpointError as e:
    print(json.dumps({"error": str(e), "seconds": time.monotonic() - t0}))
"""


@pytest.mark.parametrize(
    ("repo", "filename"),
    [("someone/an-svd", ""), ("stabilityai/stable-video-diffusion-img2vid-xt", "svd_xt.safetensors")],
)
def test_an_unreachable_hub_fails_at_once_with_the_clear_message(tmp_path, repo, filename):
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path),
    }  # nothing listens on 9
    for name in (
        "HF_HUB_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, repo, filename],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(out.stdout.splitlines()[-1])
    what = f"{repo}/{filename}" if filename else repo
    assert result["error"] == (
        f"{what} is not in the local huggingface_hub cache and the hub (http://127.0.0.1:9) could not be "
        "reached; check the connection, or pass a local .safetensors file or folder"
    )
    assert result["seconds"] < 10  # generous: a refused connection answers in milliseconds

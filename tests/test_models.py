"""Each network against diffusers/transformers on identical random weights (fp32, CPU).

The weights reach img2vid through a diffusers folder written with save_pretrained, so the folder loader and
its key table are tested on real configs at the same time.
"""

from __future__ import annotations

import pytest
import torch
from svd_reference import save_tiny_folder

import img2vid

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("svd") / "tiny-svd"
    ref = save_tiny_folder(folder)
    return ref, img2vid.load(folder, device="cpu", dtype=torch.float32)


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert scale > 1e-2, "reference output is degenerate"
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x scale {scale:.3g}"


@torch.no_grad()
def test_unet_matches_diffusers(pair):
    ref, pipe = pair
    g = torch.Generator().manual_seed(1)
    B, T, h, w = 2, 3, 8, 12  # non-square, odd frame count, two videos (CFG-like batch)
    x = torch.randn(B, T, 8, h, w, generator=g)
    c_noise = torch.tensor([0.3, -1.2])
    ctx = torch.randn(B, 1, 32, generator=g)
    vec = torch.tensor([[6.0, 127.0, 0.02], [3.0, 30.0, 0.5]])
    expect = ref.unet(x, c_noise, ctx, added_time_ids=vec).sample
    got = pipe.unet(
        x.flatten(0, 1),
        c_noise.repeat_interleave(T),
        ctx.repeat_interleave(T, 0),
        vec.repeat_interleave(T, 0),
        num_frames=T,
    ).unflatten(0, (B, T))
    close(got, expect)


@torch.no_grad()
def test_vae_encode_matches_posterior_mode(pair):
    ref, pipe = pair
    img = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    close(pipe.vae.encode(img), ref.vae.encode(img).latent_dist.mode())


@torch.no_grad()
def test_vae_temporal_decode_matches(pair):
    ref, pipe = pair
    z = torch.randn(5, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    expect = ref.vae.decode(z / ref.vae.config.scaling_factor, num_frames=5).sample
    close(pipe.vae.decode(z, num_frames=5), expect)


@torch.no_grad()
def test_image_embedding_matches(pair):
    ref, pipe = pair
    px = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    close(pipe.image_encoder(px), ref.image_encoder(px).image_embeds)


def test_config_read_from_diffusers_folder(pair):
    _, pipe = pair
    u = pipe.config.unet
    assert (u.model_channels, u.channel_mult, u.num_res_blocks) == (32, (1, 2, 2), 2)
    assert u.attention_levels == (True, True, False) and u.num_heads == (2, 4, 4)
    assert pipe.config.vae.temporal_decoder and pipe.config.clip.act == "gelu"


def test_every_parameter_is_loaded_and_random(pair):
    # A layer left at its init (or zero) would make the comparisons above weaker than they look.
    _, pipe = pair
    for net in (pipe.unet, pipe.vae, pipe.image_encoder):
        for name, p in net.named_parameters():
            assert p.device.type == "cpu" and p.dtype == torch.float32, name
            assert p.abs().sum() > 0, name


@torch.no_grad()
def test_cross_attention_to_one_token_is_its_projected_value():
    """The single-token shortcut (no norm, no q/k, no softmax) against the explicit computation, and the general
    path with several context tokens, which must still normalise the queries."""
    from img2vid.models.layers import Attention, cross_attend

    torch.manual_seed(0)
    attn, norm = Attention(32, heads=4, context_dim=16), torch.nn.LayerNorm(32)
    norm.weight.uniform_(0.5, 1.5)
    norm.bias.normal_()
    x = torch.randn(6, 10, 32)  # three query rows per context row

    def explicit(xq, ctx):
        ctx = ctx.repeat_interleave(xq.shape[0] // ctx.shape[0], 0)
        q, k, v = (
            t.unflatten(-1, (4, -1)).transpose(1, 2) for t in (attn.to_q(xq), attn.to_k(ctx), attn.to_v(ctx))
        )
        w = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
        return attn.to_out((w @ v).transpose(1, 2).flatten(2))

    one = torch.randn(2, 1, 16)
    out = cross_attend(attn, norm, x, one)
    assert out.shape == (2, 1, 32)  # broadcast by the caller
    torch.testing.assert_close(out.repeat_interleave(3, 0).expand(6, 10, 32), explicit(norm(x), one))
    three = torch.randn(2, 3, 16)
    torch.testing.assert_close(cross_attend(attn, norm, x, three), explicit(norm(x), three))


def test_cat_channels_keeps_channels_last():
    from img2vid.models.layers import cat_channels

    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 5)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (a, b)]
    out = cat_channels(cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, torch.cat([a, b], 1)) and torch.equal(cat_channels([a, b]), torch.cat([a, b], 1))

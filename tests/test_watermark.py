"""img2vid's numpy watermark against invisible-watermark (the reference's encoder and decoder) and PyWavelets."""

from __future__ import annotations

import numpy as np
import pytest

from img2vid import watermark

imwatermark = pytest.importorskip("imwatermark", reason="installed by .ci/run (pip install --no-deps)")


def _picture(h=320, w=448, noise=6.0, seed=0):
    """Gradients, a hard-edged disc and fine noise: blocks with strong and with weak peaks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack(
        [128 + 70 * np.sin(x / 30), 128 + 60 * np.cos(y / 25), 128 + 40 * np.sin((x + y) / 40)], -1
    )
    img[(y - h / 2) ** 2 + (x - w / 3) ** 2 < (h / 5) ** 2] = (200, 40, 90)
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)


def _reference_accuracy(rgb: np.ndarray) -> float:
    decoder = imwatermark.WatermarkDecoder("bits", 48)
    bits = decoder.decode(np.ascontiguousarray(rgb[..., ::-1]), "dwtDct")  # it takes BGR, as OpenCV
    return float(np.mean(np.asarray(bits) == watermark.BITS.astype(bool)))


def test_message_is_the_references():
    assert "".join(map(str, watermark.BITS)) == "101100111110110010010000011110111011000110011110"


@pytest.mark.parametrize("noise", [0.0, 6.0, 20.0])
def test_the_reference_decoder_reads_every_bit(noise):
    img = _picture(noise=noise)
    marked = watermark.embed_frame(img)
    assert marked.dtype == np.uint8 and marked.shape == img.shape
    assert _reference_accuracy(marked) == 1.0
    assert watermark.bit_accuracy(marked) == 1.0
    assert _reference_accuracy(img) < 0.9  # the unmarked picture does not carry it


def test_odd_sizes_keep_their_border():
    img = _picture(h=263, w=301)
    marked = watermark.embed_frame(img)
    assert _reference_accuracy(marked) == 1.0
    np.testing.assert_array_equal(marked[260:], img[260:])  # outside whole 4x4 cells: untouched
    np.testing.assert_array_equal(marked[:, 300:], img[:, 300:])


def test_first_pass_is_the_reference_encoder():
    img = _picture()
    ours = watermark.embed_frame(img, passes=1).astype(int)
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bits", [int(b) for b in watermark.BITS])
    ref = encoder.encode(np.ascontiguousarray(img[..., ::-1]), "dwtDct")[..., ::-1].astype(int)
    # OpenCV rounds U to 8 bits and truncates the inverse DWT; the numpy path keeps floats until the end.
    assert np.mean(np.abs(ours - ref) <= 2) > 0.97
    assert np.abs(ours - img).mean() > 1.0  # and both changed the picture about as much
    assert abs(np.abs(ours - img).mean() - np.abs(ref - img).mean()) < 0.3


def test_haar_and_u_match_pywavelets_and_opencv():
    import cv2
    import pywt

    img = _picture()
    u = watermark._u_channel(img)
    cv_u = cv2.cvtColor(np.ascontiguousarray(img[..., ::-1]), cv2.COLOR_BGR2YUV)[..., 1]
    assert np.abs(u - cv_u).max() <= 1.0
    ca, (ch, cv, cd) = pywt.dwt2(u, "haar")
    for ours, ref in zip(watermark._haar(u), (ca, ch, cv, cd), strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-9)
    np.testing.assert_allclose(watermark._inverse_haar(ca, ch, cv, cd), u, atol=1e-9)


def test_embed_marks_every_frame():
    frames = np.stack([_picture(seed=s) for s in range(3)])
    marked = watermark.embed(frames)
    assert marked.shape == frames.shape
    assert [_reference_accuracy(f) for f in marked] == [1.0, 1.0, 1.0]

"""img2vid.image: each input of a corpus built here loads as the right RGB image or raises ImageError."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from img2vid import image as image_mod
from img2vid.errors import ImageError, ParameterError
from img2vid.image import fit_image, load_image, prepare_image, target_size, to_tensor


def rgb(img):
    return np.asarray(img).astype(int)


def png_header_only(path, width, height):
    """A PNG whose header claims width x height, with no pixel data: a bomb that costs nothing to make."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")))
    return path


def noisy(size, seed=0):
    """Random pixels, so that compressed files are large enough to truncate meaningfully."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8))


# --- files that must be refused with a message naming them -------------------------------------------------


def test_missing_file(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="no such file") as e:
        load_image(p)
    assert str(p) in str(e.value)


def test_directory(tmp_path):
    with pytest.raises(ImageError, match="is a folder") as e:
        load_image(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty file \(0 bytes\)") as e:
        load_image(str(p))
    assert str(p) in str(e.value)


def test_text_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("these are not pixels\n" * 10)
    with pytest.raises(ImageError, match="not an image") as e:
        load_image(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    p = tmp_path / f"cut.{fmt.lower()}"
    buf = io.BytesIO()
    noisy((128, 128)).save(buf, fmt)
    data = buf.getvalue()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as e:
        load_image(p)
    assert str(p) in str(e.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # we rely on Pillow's default and never change it


def test_bytes_and_bad_types():
    buf = io.BytesIO()
    Image.new("RGB", (8, 4), (1, 2, 3)).save(buf, "PNG")
    img = load_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (8, 4) and img.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"GIF? no")
    with pytest.raises(ImageError, match="unsupported image source of type int"):
        load_image(123)


@pytest.mark.parametrize(("size", "match"), [((20000, 20000), "too large"), ((9000, 8000), "72 megapixels")])
def test_decompression_bomb_refused_from_header(tmp_path, size, match):
    # 20000x20000 trips Pillow's own hard limit at open(); 9000x8000 passes it and hits MAX_PIXELS.
    limit = Image.MAX_IMAGE_PIXELS
    p = png_header_only(tmp_path / "bomb.png", *size)
    with pytest.raises(ImageError, match=match) as e:
        load_image(p)
    assert str(p) in str(e.value) and "too large" in str(e.value)
    assert limit == Image.MAX_IMAGE_PIXELS  # the global limit is left alone


def test_max_pixels_is_configurable(tmp_path, monkeypatch):
    p = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(p)
    monkeypatch.setattr(image_mod, "MAX_PIXELS", 5000)
    with pytest.raises(ImageError, match="too large: 100x100"):
        load_image(p)
    with pytest.raises(ImageError, match="too large"):
        load_image(np.zeros((100, 100, 3), np.uint8))


# --- files that must load as the right RGB image ------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (100, 100)])
def test_tiny_images_load_and_fit(tmp_path, size):
    p = tmp_path / "tiny.png"
    Image.new("RGB", size, (10, 200, 30)).save(p)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == size
    out = prepare_image(p)
    assert out.size == (1024, 576) and out.mode == "RGB"
    assert np.abs(rgb(out) - (10, 200, 30)).max() <= 1  # uniform colour survives upscaling


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(p, quality=95)  # pure red in CMYK
    assert Image.open(p).mode == "CMYK"
    img = load_image(p)
    assert img.mode == "RGB"
    assert np.abs(rgb(img)[16, 16] - (255, 0, 0)).max() <= 4


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "deep.png"
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(p)
    assert Image.open(p).mode.startswith("I")  # really a 16-bit file
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (256, 4)
    a = rgb(img)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert np.abs(a[0, :, 0] - ramp[0] / 257).max() <= 0.5  # the ramp spans 0..255 and doesn't saturate
    assert a[0, 0, 0] == 0 and a[0, 128, 0] == 128 and a[0, -1, 0] == 255


def test_palette_png_with_transparency(tmp_path):
    p = tmp_path / "pal.png"
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0: black (transparent), 1: blue
    img.putpixel((3, 1), 1)
    img.save(p, transparency=0)
    out = load_image(p)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((3, 1)) == (0, 0, 255)


def test_la_and_rgba_composite_on_white(tmp_path):
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    la.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)

    Image.new("RGBA", (2, 2), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.mode == "RGB"
    assert np.abs(rgb(out)[0, 0] - (255, 127, 127)).max() <= 1  # half-transparent red over white


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])  # GIF, APNG, animated WebP
def test_animation_gives_first_frame(tmp_path, fmt):
    p = tmp_path / f"anim.{fmt.lower()}"
    frames = [Image.new("RGB", (16, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(p, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    assert Image.open(p).n_frames == 3
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (16, 8)
    assert np.abs(rgb(img) - (255, 0, 0)).max() <= 2


def test_grey_and_one_bit(tmp_path):
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    Image.new("1", (3, 3), 1).save(tmp_path / "one.png")
    assert load_image(tmp_path / "l.png").getpixel((1, 1)) == (77, 77, 77)
    assert load_image(tmp_path / "one.png").getpixel((1, 1)) == (255, 255, 255)


# Where each orientation's stored pixels end up when displayed (EXIF spec), written with numpy.
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
    # Four flat quadrants, 48x32 blocks, so JPEG noise stays small away from the edges: asymmetric under
    # every flip and rotation.
    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:32, :48], stored[:32, 48:], stored[32:, :48], stored[32:, 48:] = (
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored).save(p, quality=95, exif=exif)
    img = load_image(p)
    expected = DISPLAYED[orientation](stored)
    assert img.mode == "RGB" and img.size == (expected.shape[1], expected.shape[0])
    assert np.median(np.abs(rgb(img) - expected)) <= 3
    assert "exif" not in img.info or img.getexif().get(0x0112, 1) == 1  # not rotated twice downstream


# --- arrays and PIL images ----------------------------------------------------------------------------------


def test_arrays():
    a = np.zeros((4, 6, 3), np.uint8)
    a[..., 0] = 200
    assert load_image(a).getpixel((5, 3)) == (200, 0, 0) and load_image(a).size == (6, 4)
    assert load_image(np.full((4, 6), 9, np.uint8)).getpixel((0, 0)) == (9, 9, 9)
    assert load_image(np.full((4, 6, 3), 1.0, np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.full((4, 6, 3), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    for bad, match in [
        (np.zeros((4, 6, 2), np.uint8), r"expected \(H, W\)"),
        (np.zeros((2, 4, 6, 3), np.uint8), r"expected \(H, W\)"),
        (np.zeros((4, 6, 3), np.uint16), "unsupported dtype"),
        (np.zeros((4, 6, 3), np.int64), "unsupported dtype"),
        (np.full((4, 6, 3), 2.0), r"in \[0, 1\]"),
        (np.full((4, 6, 3), np.nan), r"in \[0, 1\]"),
        (np.zeros((0, 6, 3), np.uint8), "no pixels"),
    ]:
        with pytest.raises(ImageError, match=match):
            load_image(bad)


def test_pil_image_input_is_not_modified():
    src = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    out = load_image(src)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    assert src.mode == "RGBA" and out is not src


# --- target_size -------------------------------------------------------------------------------------------


def test_target_size_defaults():
    assert target_size((1920, 1080)) == (1024, 576)
    assert target_size((1080, 1920)) == (576, 1024)
    assert target_size((500, 500)) == (1024, 576)


def test_target_size_explicit_and_one_side():
    assert target_size((1080, 1920), 512, 768) == (512, 768)
    assert target_size((1920, 1080), width=512) == (512, 320)  # 288 -> nearest multiple of 64, halves up
    assert target_size((1920, 1080), height=768) == (1344, 768)
    assert target_size((1080, 1920), height=1024) == (576, 1024)
    assert target_size((100, 10000), width=512) == (512, 2048)  # clamped
    assert target_size((10000, 100), width=512) == (512, 256)


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        (1000, 576, "1000x576 is not a valid size: sides must be multiples of 64 between 256 and 2048; "
         "nearest: 1024x576 or 960x576"),
        (128, 576, "nearest: 256x576"),
        (4096, 576, "nearest: 2048x576"),
        (1024, 577, "nearest: 1024x576 or 1024x640"),
        (1000, None, "width 1000 is not valid: .* nearest: 1024 or 960"),
        (None, 200, "height 200 is not valid: .* nearest: 256"),
        (1024.5, 576, "width must be a whole number"),
        (True, 576, "width must be a whole number"),
    ],
)  # fmt: skip
def test_target_size_invalid(width, height, message):
    with pytest.raises(ImageError, match=message):
        target_size((1920, 1080), width, height)


# --- fit_image, to_tensor -----------------------------------------------------------------------------------


def red_square_on_wide_grey():
    a = np.full((100, 300, 3), 128, np.uint8)
    a[25:75, 125:175] = (255, 0, 0)  # 50x50 red square in the middle
    return Image.fromarray(a)


def red_box(img):
    ys, xs = np.nonzero((rgb(img)[..., 0] > 200) & (rgb(img)[..., 1] < 60))
    return xs.min(), xs.max(), ys.min(), ys.max()


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_fit_keeps_aspect(fit):
    out = fit_image(red_square_on_wide_grey(), 256, 512, fit)  # a tall frame for a wide image
    assert out.size == (256, 512) and out.mode == "RGB"
    x0, x1, y0, y1 = red_box(out)
    assert abs((x1 - x0) - (y1 - y0)) <= 2  # still a square, not squashed
    assert abs((x0 + x1) / 2 - 127.5) <= 1 and abs((y0 + y1) / 2 - 255.5) <= 1  # still centred
    a = rgb(out)
    if fit == "pad":  # scaled to 256 wide (x0.853): the square is ~43 px; black bars above and below
        assert 40 <= x1 - x0 <= 46
        assert (a[:150] == 0).all() and (a[-150:] == 0).all() and (a[256, 5] == 128).all()
    else:  # scaled to 512 high (x5.12): the square is ~256 px and fills the width; no black anywhere
        assert x1 - x0 >= 250 and (a > 100).any(axis=-1).all()


def test_fit_identity_and_bad_fit():
    img = noisy((320, 256))
    assert np.array_equal(np.asarray(fit_image(img, 320, 256)), np.asarray(img))
    assert np.array_equal(np.asarray(fit_image(img, 320, 256, "pad")), np.asarray(img))
    with pytest.raises(ParameterError, match="fit"):
        fit_image(img, 320, 256, "stretch")


def test_prepare_image_portrait(tmp_path):
    p = tmp_path / "portrait.jpg"
    noisy((300, 500)).save(p)
    out = prepare_image(p, fit="pad")
    assert out.size == (576, 1024) and out.mode == "RGB"
    assert prepare_image(p, height=512).size == (320, 512)


def test_to_tensor():
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 0] = (255, 0, 128)
    t = to_tensor(Image.fromarray(a))
    assert t.dtype == torch.float32 and t.shape == (3, 2, 3)
    assert t[0, 0, 0] == 1 and t[1, 0, 0] == -1 and abs(t[2, 0, 0] - (128 / 127.5 - 1)) < 1e-6
    assert t.min() >= -1 and t.max() <= 1 and t[:, 1, 1].eq(-1).all()

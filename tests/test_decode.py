"""Decoding foreign images (pipeline.data.decode): formats, modes, orientation, alpha,
sizing policies, extreme shapes and decompression bombs. Pure unit tests: Pillow in
memory, no Ray, no files."""

from __future__ import annotations

import io
import resource
import struct
import tracemalloc
import warnings
import zlib
from typing import get_args

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from pipeline.config import DataConfig
from pipeline.data.decode import (
    ACCEPTED_MODES,
    BACKGROUNDS,
    IMAGE_EXTENSIONS,
    RESIZE_POLICIES,
    BadSample,
    DecodeSpec,
    decode_image,
)

R = 8


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _halves(width: int, height: int, dark: int = 40, bright: int = 200) -> np.ndarray:
    """uint8 (height, width): left half ``dark``, right half ``bright``."""
    array = np.full((height, width), dark, dtype=np.uint8)
    array[:, width // 2 :] = bright
    return array


def _sixteen(values: np.ndarray, mode: str) -> Image.Image:
    """uint16 ``values`` as an ``I;16`` (little-endian) or ``I;16B`` image, bytes as given
    (Pillow's ``convert("I;16B")`` clips to 255)."""
    dtype = "<u2" if mode == "I;16" else ">u2"
    height, width = values.shape
    return Image.frombytes(mode, (width, height), values.astype(dtype).tobytes())


def _in_mode(grey: np.ndarray, mode: str) -> Image.Image:
    """The 8-bit grey picture ``grey`` as an image of ``mode`` (wide modes scaled up)."""
    if mode in ("I;16", "I;16B"):
        return _sixteen(grey.astype(np.uint16) * 257, mode)
    if mode == "I":
        return Image.fromarray(grey.astype(np.int32) * 257)
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / 255.0)
    base = Image.fromarray(grey).convert("RGB")
    if mode == "LA":
        return Image.fromarray(grey).convert("LA")
    if mode == "PA":
        return base.convert("P").convert("PA")
    return base.convert(mode)


# (extension, Pillow writer, modes that writer stores and Pillow opens back)
CASES = [
    ("png", "PNG", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]),
    ("jpg", "JPEG", ["L", "RGB", "CMYK"]),
    ("jpeg", "JPEG", ["RGB"]),
    ("webp", "WEBP", ["RGB", "RGBA"]),
    ("ppm", "PPM", ["RGB", "I"]),
    ("pgm", "PPM", ["L"]),
    ("pbm", "PPM", ["1"]),
    ("pnm", "PPM", ["RGB"]),
    ("bmp", "BMP", ["1", "L", "P", "RGB"]),
    ("tiff", "TIFF", ["L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "F"]),
    ("tif", "TIFF", ["I;16B", "I", "RGB"]),
    ("gif", "GIF", ["L", "P"]),
]


def test_extension_table_covers_the_publishers_formats():
    assert set(IMAGE_EXTENSIONS) == {ext for ext, _, _ in CASES}
    assert list(IMAGE_EXTENSIONS)[:4] == ["png", "jpg", "jpeg", "webp"]  # preference order
    for ext, fmt, modes in CASES:
        assert IMAGE_EXTENSIONS[ext] == fmt
        for mode in modes:
            opened = Image.open(io.BytesIO(_save(_in_mode(_halves(16, 12), mode), fmt)))
            assert opened.mode in ACCEPTED_MODES, (ext, mode, opened.mode)


@pytest.mark.parametrize(
    ("ext", "fmt", "mode"), [(ext, fmt, mode) for ext, fmt, modes in CASES for mode in modes]
)
def test_every_format_and_mode_decodes_to_the_picture(ext, fmt, mode):
    source = _in_mode(_halves(16, 12), mode)
    data = _save(source, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    for channels in (1, 3):
        out = decode_image(data, ext, DecodeSpec(R, channels))
        assert out.dtype == np.uint8 and out.shape == (R, R, channels)
        left, right = out[:, : R // 2 - 1].astype(float), out[:, R // 2 + 1 :].astype(float)
        if mode in ("1", "P", "PA") and fmt in ("PNG", "BMP", "PPM", "TIFF", "GIF"):
            assert left.mean() < right.mean() - 60  # 1: thresholded; P: palette
        else:  # dark stays dark (~40), bright stays bright (~200): never clipped to white
            assert abs(left.mean() - 40) < 12 and abs(right.mean() - 200) < 12, (
                left.mean(),
                right.mean(),
            )


@pytest.mark.parametrize(
    ("ext", "fmt", "mode"),
    [("png", "PNG", "L"), ("png", "PNG", "RGB"), ("webp", "WEBP", "RGB"), ("ppm", "PPM", "RGB"),
     ("pgm", "PPM", "L"), ("bmp", "BMP", "RGB"), ("tiff", "TIFF", "L"), ("tif", "TIFF", "RGB")],
)  # fmt: skip
def test_stored_size_and_mode_come_back_exactly_without_resampling(ext, fmt, mode, monkeypatch):
    rng = np.random.default_rng(1)
    shape = (R, R) if mode == "L" else (R, R, 3)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = _save(Image.fromarray(pixels), fmt, **kw)
    resized: list[object] = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda self, *a, **k: resized.append(a) or real_resize(self, *a, **k)
    )
    out = decode_image(data, ext, DecodeSpec(R, 1 if mode == "L" else 3))
    np.testing.assert_array_equal(out.reshape(shape), pixels)
    assert resized == []


def test_jpeg_draft_still_used_for_large_jpegs(monkeypatch):
    calls: list[tuple] = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile,
        "draft",
        lambda self, mode, size: calls.append((mode, size)) or real(self, mode, size),
    )
    data = _save(Image.fromarray(_halves(64, 48)).convert("RGB"), "JPEG", quality=95)
    out = decode_image(data, "jpg", DecodeSpec(R, 1))
    assert calls == [("L", (R, R))] and out.shape == (R, R, 1)
    assert out[:, :2].mean() < 60 and out[:, -2:].mean() > 180


# --------------------------------------------------------------------------- wide modes
def _round_257(values: np.ndarray) -> np.ndarray:
    return np.floor(values.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B")])
def test_16_bit_scaled_by_round_v_over_257(fmt, mode):
    values = np.array(
        [0, 1, 128, 129, 257, 385, 386, 1000, 12345, 32767, 32768, 40000, 60000, 65277, 65534,
         65535], dtype=np.uint16,
    ).reshape(4, 4)  # fmt: skip
    image = _sixteen(values, mode)
    data = _save(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    out = decode_image(data, fmt.lower(), DecodeSpec(4, 1))[:, :, 0]
    np.testing.assert_array_equal(out, _round_257(values))
    assert out[2, 2] == 128  # 32768 is mid-grey, not white (Pillow's own convert clips)
    rgb = decode_image(data, fmt.lower(), DecodeSpec(4, 3))
    assert all((rgb[:, :, c] == out).all() for c in range(3))


def test_32_bit_integer_clipped_to_16_bits_then_scaled():
    values = np.array(
        [-70000, -1, 0, 128, 129, 257, 32768, 65535, 65536, 70000, 2**31 - 1, 500, 1000, 2000,
         40000, 3], dtype=np.int32,
    ).reshape(4, 4)  # fmt: skip
    for fmt in ("TIFF", "PPM"):
        if fmt == "PPM":  # PPM holds 0..65535 only
            values = np.clip(values, 0, 65535)
        data = _save(Image.fromarray(values), fmt)
        assert Image.open(io.BytesIO(data)).mode == "I"
        out = decode_image(data, fmt.lower(), DecodeSpec(4, 1))[:, :, 0]
        np.testing.assert_array_equal(out, _round_257(np.clip(values, 0, 65535)))


def test_float_clipped_to_unit_range_then_scaled():
    values = np.array(
        [-1.0, -0.0, 0.0, 0.001, 0.002, 0.25, 0.5, 0.75, 0.999, 1.0, 1.5, 100.0, np.nan, 0.1,
         0.2, 0.3], dtype=np.float32,
    ).reshape(4, 4)  # fmt: skip
    data = _save(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = decode_image(data, "tiff", DecodeSpec(4, 1))[:, :, 0]
    expected = np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255.0)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_a_16_bit_picture_resized_keeps_its_scale():
    grey = np.full((20, 30), 100, dtype=np.uint16) * 257  # 25700 -> 100
    out = decode_image(_save(Image.fromarray(grey), "PNG"), "png", DecodeSpec(R, 1))
    assert (np.abs(out.astype(int) - 100) <= 1).all()


# --------------------------------------------------------------------------- orientation
def _marked(size: int = R) -> np.ndarray:
    array = np.zeros((size, size), dtype=np.uint8)
    array[:3, :3] = 255  # a bright block in the top-left corner
    array[-2:, :] = 120  # a grey bar along the bottom
    return array


@pytest.mark.parametrize(("ext", "fmt"), [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_exif_orientation_applied_before_sizing(ext, fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    kw = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    picture = Image.fromarray(_marked())
    upright = decode_image(_save(picture, fmt, **kw), ext, DecodeSpec(R, 1))[:, :, 0]
    rotated = decode_image(_save(picture, fmt, exif=exif.tobytes(), **kw), ext, DecodeSpec(R, 1))
    np.testing.assert_array_equal(rotated[:, :, 0], np.rot90(upright, k=-1))
    assert rotated[:3, -3:].min() > 200 and rotated[-3:, -3:].max() < 30  # block: top-right
    assert abs(rotated[:, :2].mean() - 120) < 8  # the bottom bar is now on the left
    # a non-square picture: rotation comes first, so the tall result is what gets cropped
    wide = np.zeros((R, 3 * R), dtype=np.uint8)
    wide[:, :R] = 255  # left third bright
    data = _save(Image.fromarray(wide), fmt, exif=exif.tobytes(), **kw)
    padded = decode_image(data, ext, DecodeSpec(3 * R, 1, resize="pad"))[:, :, 0]
    assert padded[: R - 1, R + 1 : 2 * R - 1].mean() > 200  # left third is now the top third
    assert padded[2 * R + 1 :, R + 1 : 2 * R - 1].mean() < 30
    assert padded[:, :R].max() < 30  # letterbox columns (black)


# --------------------------------------------------------------------------- alpha
@pytest.mark.parametrize("background", ["black", "white"])
def test_alpha_composited_onto_the_background(background):
    level = BACKGROUNDS[background]
    rgba = np.zeros((R, R, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, : R // 2, 3] = 0  # left: fully transparent
    rgba[:, R // 2 :, 3] = 255  # right: opaque grey 200
    rgba[0, -1] = (255, 255, 255, 128)  # one half-transparent white pixel
    spec1, spec3 = DecodeSpec(R, 1, background=background), DecodeSpec(R, 3, background=background)
    for ext, fmt in [("png", "PNG"), ("tiff", "TIFF"), ("webp", "WEBP")]:
        kw = {"lossless": True} if fmt == "WEBP" else {}
        data = _save(Image.fromarray(rgba), fmt, **kw)
        for spec in (spec1, spec3):
            out = decode_image(data, ext, spec).astype(int)
            assert (out[:, : R // 2] == level).all()
            assert (out[1:, R // 2 :] == 200).all()
            assert abs(out[0, -1].mean() - (255 * 128 + level * 127) / 255) <= 1
    # grey + alpha, and a palette GIF whose transparent index is the left half
    la = Image.fromarray(rgba[..., [0, 3]], mode="LA")
    assert (decode_image(_save(la, "PNG"), "png", spec1)[:, : R // 2] == level).all()
    gif = Image.fromarray(_halves(R, R, 10, 200)).convert("P")
    index = gif.getpixel((0, 0))
    out = decode_image(_save(gif, "GIF", transparency=index), "gif", spec1)
    assert (out[:, : R // 2] == level).all() and (out[:, R // 2 :] == 200).all()


# --------------------------------------------------------------------------- sizing
def _columns(height: int, width: int) -> np.ndarray:
    """Each column holds its own index * 5: where a crop started is readable."""
    assert width * 5 < 256
    return np.tile((np.arange(width) * 5).astype(np.uint8), (height, 1))


def test_random_crop_follows_crop_at_and_centre_is_one_half():
    wide = _save(Image.fromarray(_columns(R, 3 * R)), "PNG")  # 8 x 24: crop slides 0..16
    spec = DecodeSpec(R, 1, resize="random_crop")
    at = {a: decode_image(wide, "png", spec, crop_at=a)[:, :, 0] for a in (0.0, 0.25, 0.5, 1.0)}
    for a, offset in [(0.0, 0), (0.25, 4), (0.5, 8), (1.0, 16)]:
        np.testing.assert_array_equal(at[a], _columns(R, 3 * R)[:, offset : offset + R])
    centre = decode_image(wide, "png", DecodeSpec(R, 1))[:, :, 0]
    np.testing.assert_array_equal(centre, at[0.5])
    np.testing.assert_array_equal(decode_image(wide, "png", spec)[:, :, 0], centre)  # None
    # center_crop ignores crop_at; random_crop along a tall picture moves vertically
    np.testing.assert_array_equal(
        decode_image(wide, "png", DecodeSpec(R, 1), crop_at=0.0)[:, :, 0], centre
    )
    tall = _columns(R, 3 * R).T.copy()
    top = decode_image(_save(Image.fromarray(tall), "PNG"), "png", spec, crop_at=0.0)
    np.testing.assert_array_equal(top[:, :, 0], tall[:R])
    # with scaling (shorter side 16 -> 8): offsets still differ
    big = _save(Image.fromarray(_columns(2 * R, 6 * R)), "PNG")
    first, last = (decode_image(big, "png", spec, crop_at=a) for a in (0.0, 1.0))
    assert first.mean() < last.mean() - 60  # columns 0..15 vs 32..47 (5 per column)
    with pytest.raises(ValueError, match="crop_at"):
        decode_image(wide, "png", spec, crop_at=1.5)


@pytest.mark.parametrize("background", ["black", "white"])
def test_pad_keeps_the_whole_picture_on_the_background(background):
    level = BACKGROUNDS[background]
    picture = _halves(2 * R, R, 50, 250)  # 16 wide x 8 high -> 8 x 4 inside the square
    spec = DecodeSpec(R, 3, resize="pad", background=background)
    out = decode_image(_save(Image.fromarray(picture), "PNG"), "png", spec).astype(int)
    assert (out[:2] == level).all() and (out[-2:] == level).all()  # letterbox rows
    inner = out[2:-2]
    assert np.abs(inner[:, 0] - 50).max() <= 3 and np.abs(inner[:, -1] - 250).max() <= 3
    assert (
        abs(inner[:, : R // 2 - 1].mean() - 50) < 5 and abs(inner[:, R // 2 + 1 :].mean() - 250) < 5
    )
    # a tall picture pads left and right; a square one is only scaled
    tall = decode_image(_save(Image.fromarray(picture.T.copy()), "PNG"), "png", spec)
    assert (tall[:, :2] == level).all() and (tall[:, -2:] == level).all()
    square = decode_image(_save(Image.fromarray(_halves(2 * R, 2 * R)), "PNG"), "png", spec)
    assert square[:, 0].mean() < 60 and square[:, -1].mean() > 190


@pytest.mark.parametrize("resize", RESIZE_POLICIES)
@pytest.mark.parametrize(("width", "height"), [(1, 300), (300, 1), (1, 1), (2, 1000)])
def test_no_aspect_ratio_or_size_is_refused(resize, width, height):
    ramp = (np.arange(width * height) % 200 + 50).astype(np.uint8).reshape(height, width)
    data = _save(Image.fromarray(ramp), "PNG")
    for channels in (1, 3):
        out = decode_image(data, "png", DecodeSpec(R, channels, resize=resize), crop_at=0.3)
        assert out.shape == (R, R, channels)
        if resize == "pad":
            # the picture is there (values >= ~50 on a black background)
            assert (out > 30).any()
            if (width, height) == (1, 1):
                assert (out == 50).all()  # 1x1 scaled up fills the square
            elif width < height:  # a 1-pixel column, the rest background
                assert (out[:, : R // 2 - 1] == 0).all() and (out[:, R // 2 + 1 :] == 0).all()
        else:
            assert (out > 30).all()  # all picture, no background


# --------------------------------------------------------------------------- frames
def test_animated_gif_and_multipage_tiff_give_their_first_frame():
    frames = [Image.fromarray(np.full((R, R), v, dtype=np.uint8)) for v in (10, 240)]
    gif = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    assert (decode_image(gif, "gif", DecodeSpec(R, 1)) == 10).all()
    tiff = _save(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(tiff)).n_frames == 2
    assert (decode_image(tiff, "tiff", DecodeSpec(R, 3)) == 10).all()
    reversed_gif = _save(frames[1], "GIF", save_all=True, append_images=frames[:1])
    assert (decode_image(reversed_gif, "gif", DecodeSpec(R, 1)) == 240).all()


# --------------------------------------------------------------------------- refused
def test_only_the_named_formats_are_parsed_and_pickles_never():
    tga = _save(Image.fromarray(_halves(R, R)), "TGA")  # Pillow reads TGA, the table does not
    pcx = _save(Image.fromarray(_halves(R, R)), "PCX")
    for data in (tga, pcx):
        assert Image.open(io.BytesIO(data)).size == (R, R)
        for ext in ("png", "tiff", "gif"):
            with pytest.raises(BadSample, match="undecodable"):
                decode_image(data, ext, DecodeSpec(R, 1))
    with pytest.raises(BadSample, match="unsupported image type"):
        decode_image(b"\x80\x04K\x01.", "pkl", DecodeSpec(R, 1))
    with pytest.raises(BadSample, match="unsupported image type"):
        decode_image(tga, "tga", DecodeSpec(R, 1))
    # a PNG stored under another allowed extension still decodes
    png = _save(Image.fromarray(_halves(R, R)), "PNG")
    np.testing.assert_array_equal(
        decode_image(png, "jpg", DecodeSpec(R, 1))[:, :, 0], _halves(R, R)
    )


def test_unknown_mode_is_a_bad_sample():
    lab = Image.new("LAB", (R, R))
    data = _save(lab, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    with pytest.raises(BadSample, match="unexpected image mode 'LAB'"):
        decode_image(data, "tiff", DecodeSpec(R, 3))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR (with a valid CRC) claims ``width`` x ``height``."""
    data = bytearray(_save(Image.fromarray(np.zeros((4, 4), np.uint8)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize(
    ("width", "height", "shown"),
    [(30000, 30000, "900,000,000 pixels"), (10000, 10000, "10000x10000 = 100,000,000 pixels")],
)  # above Pillow's own error limit; between its warning and error (our limit decides)
def test_decompression_bomb_refused_from_the_header(width, height, shown, monkeypatch):
    data = _png_claiming(width, height)
    assert len(data) < 200
    loads: list[tuple[int, int]] = []
    real_prepare = ImageFile.ImageFile.load_prepare
    monkeypatch.setattr(
        ImageFile.ImageFile,
        "load_prepare",
        lambda self: loads.append(self.size) or real_prepare(self),
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not leak
            with pytest.raises(BadSample) as info:
                decode_image(data, "png", DecodeSpec(R, 1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    reason = info.value.reason
    assert reason.startswith("decompression bomb") and shown in reason
    assert "67,108,864 (data.max_pixels)" in reason
    assert loads == []  # pixel memory (ImageFile.load_prepare) was never allocated
    assert peak < 2 * 1024 * 1024
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024  # KiB
    if width * height <= 128 * 1024 * 1024:
        # control: allowed by a larger limit, the same bytes reach the pixel allocation
        with pytest.raises(BadSample, match="undecodable"):
            decode_image(data, "png", DecodeSpec(R, 1, max_pixels=128 * 1024 * 1024))
        assert loads == [(width, height)]


def test_max_pixels_is_the_spec_limit_inclusive():
    data = _save(Image.fromarray(_halves(64, 64)), "PNG")
    assert decode_image(data, "png", DecodeSpec(R, 1, max_pixels=64 * 64)).shape == (R, R, 1)
    with pytest.raises(BadSample, match=r"decompression bomb: 64x64 = 4,096 pixels.*4,095"):
        decode_image(data, "png", DecodeSpec(R, 1, max_pixels=64 * 64 - 1))
    jpeg = _save(Image.fromarray(_halves(64, 64)), "JPEG")  # checked before draft() and load
    with pytest.raises(BadSample, match="decompression bomb"):
        decode_image(jpeg, "jpg", DecodeSpec(R, 1, max_pixels=100))


# --------------------------------------------------------------------------- spec/config
def test_spec_validates_and_config_offers_what_decode_implements():
    for bad in ({"resize": "stretch"}, {"background": "grey"}, {"max_pixels": 0}):
        with pytest.raises(ValueError):
            DecodeSpec(R, 1, **bad)
    fields = DataConfig.model_fields
    assert get_args(fields["resize"].annotation) == RESIZE_POLICIES
    assert set(get_args(fields["alpha_background"].annotation)) == set(BACKGROUNDS)
    cfg = DataConfig()
    spec = DecodeSpec(R, 1)
    assert (cfg.resize, cfg.alpha_background, cfg.max_pixels) == (
        spec.resize,
        spec.background,
        spec.max_pixels,
    )
    assert (cfg.resize, cfg.alpha_background, cfg.max_pixels) == ("center_crop", "black", 2**26)

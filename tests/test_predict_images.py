"""`predict` reads an image as a viewer shows it: every mode PIL opens, upright by its EXIF orientation,
made the 8-bit RGB the model was trained on. Each expected picture is computed here with numpy from the
pixel values written, not by the PIL conversion the code uses; the 16-bit PNGs and TIFFs are written
byte by byte, so no PIL encoder stands between the values and the file."""
from __future__ import annotations

import colorsys
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.errors import UserError
from app.predict import load_image, viewer_rgb
from tests.support import one_error_line, run_main

RNG = np.random.default_rng(18)


@pytest.fixture
def run_dir(finished_run) -> Path:
    return finished_run.run_dir


def _shown(path: Path) -> np.ndarray:
    """What predict feeds the model, as (H, W, 3): for an image whose shorter side is 32 the resize does
    nothing, so this is the converted picture's centre 32x32."""
    return load_image(path).permute(1, 2, 0).numpy()


def _centre(a: np.ndarray) -> np.ndarray:
    top, left = (a.shape[0] - 32) // 2, (a.shape[1] - 32) // 2
    return a[top:top + 32, left:left + 32]


def _grey3(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(a)[..., None], 3, axis=2).astype(np.uint8)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    c, a = colour.astype(float), alpha.astype(float)[..., None]
    return np.round(c * a / 255 + 255 * (1 - a / 255)).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png16(path: Path, values: np.ndarray, colour_type: int, extra: bytes = b"") -> Path:
    """A 16-bit PNG of `values` (H, W[, C]), big-endian rows each behind filter byte 0."""
    rows = np.asarray(values, dtype=">u2").reshape(values.shape[0], -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", values.shape[1], values.shape[0], 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", zlib.compress(raw))
                     + _chunk(b"IEND", b""))
    return path


def _tiff(path: Path, values: np.ndarray, photometric: int, extra_samples: int | None = None) -> Path:
    """An uncompressed little-endian TIFF of `values` (H, W, C), uint8 or uint16, in one strip."""
    height, width, samples = values.shape
    bits = values.dtype.itemsize * 8
    pixels = np.ascontiguousarray(values, dtype=f"<u{values.dtype.itemsize}").tobytes()
    tags = [(256, 4, width), (257, 4, height), (258, 3, None), (259, 3, 1), (262, 3, photometric), (273, 4, None),
            (277, 3, samples), (278, 4, height), (279, 4, len(pixels)), (284, 3, 1)]
    tags += [] if extra_samples is None else [(338, 3, extra_samples)]
    bits_at = 8 + 2 + 12 * len(tags) + 4
    pixels_at = bits_at + 2 * samples
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        if tag == 258:
            ifd += struct.pack("<HHII", tag, kind, samples, bits_at)
        elif tag == 273:
            ifd += struct.pack("<HHII", tag, kind, 1, pixels_at)
        else:
            ifd += struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, 1,
                                                                                                   value)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
                     + struct.pack(f"<{samples}H", *[bits] * samples) + pixels)
    return path


def _u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def _u16(*shape: int) -> np.ndarray:
    return RNG.integers(0, 65536, shape).astype(np.uint16)


# --- 16 bits: the high byte (value >> 8), never PIL's clip to 255 --------------------------------------------------

def test_a_16_bit_grey_png_keeps_the_high_byte_not_a_washed_out_white(tmp_path: Path) -> None:
    gradient = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    shown = _shown(_png16(tmp_path / "g.png", gradient, colour_type=0))
    assert np.array_equal(shown, _grey3(gradient >> 8))
    assert shown.mean() == pytest.approx(127.5, abs=1)  # not the near-white of a clip to 255


def test_16_bit_grey_rounds_down_to_its_high_byte(tmp_path: Path) -> None:
    """The rule exactly, at the values where >> 8 and rounding value / 257 part."""
    values = np.array([0, 128, 129, 255, 256, 32767, 32768, 65279, 65280, 65535] * 103)[:1024]
    shown = _shown(_png16(tmp_path / "g.png", values.reshape(32, 32).astype(np.uint16), colour_type=0))
    assert shown[0, :10, 0].tolist() == [0, 0, 0, 0, 1, 127, 128, 254, 255, 255]


def test_16_bit_grey_in_tiff_big_and_little_endian(tmp_path: Path) -> None:
    values = _u16(32, 32)
    for mode in ("I;16", "I;16B"):
        path = tmp_path / f"{mode}.tif"
        Image.frombytes(mode, (32, 32), values.astype("<u2" if mode == "I;16" else ">u2").tobytes()).save(path)
        assert Image.open(path).mode == mode
        assert np.array_equal(_shown(path), _grey3(values >> 8)), mode


def test_a_16_bit_grey_value_marked_transparent_is_white(tmp_path: Path) -> None:
    values = _u16(32, 32)
    clear = int(values[3, 4])
    path = _png16(tmp_path / "g.png", values, colour_type=0, extra=_chunk(b"tRNS", struct.pack(">H", clear)))
    expected = _grey3(values >> 8)
    expected[values == clear] = 255
    assert np.array_equal(_shown(path), expected)


def test_16_bit_colour_png_and_tiff_keep_the_high_byte(tmp_path: Path) -> None:
    rgb, rgba, la = _u16(32, 32, 3), _u16(32, 32, 4), _u16(32, 32, 2)
    assert np.array_equal(_shown(_png16(tmp_path / "rgb.png", rgb, colour_type=2)), rgb >> 8)
    assert np.array_equal(_shown(_tiff(tmp_path / "rgb.tif", rgb, photometric=2)), rgb >> 8)
    high = rgba >> 8
    assert np.array_equal(_shown(_png16(tmp_path / "rgba.png", rgba, colour_type=6)),
                          _over_white(high[..., :3], high[..., 3]))
    high = la >> 8
    assert np.array_equal(_shown(_png16(tmp_path / "la.png", la, colour_type=4)),
                          _over_white(_grey3(high[..., 0]), high[..., 1]))


def test_a_pgm_of_more_than_8_bits_is_scaled_by_its_maximum(tmp_path: Path) -> None:
    """PIL opens it as mode I, scaled to 0..65535, so the 16-bit rule applies to value * 65535 / maxval."""
    values = RNG.integers(0, 1024, (32, 32))
    path = tmp_path / "ten_bits.pgm"
    path.write_bytes(b"P5 32 32 1023\n" + values.astype(">u2").tobytes())
    assert Image.open(path).mode == "I"
    assert np.array_equal(_shown(path), _grey3(np.round(values * 65535 / 1023).astype(np.int64) >> 8))


def test_32_bit_integer_and_float_tiffs_within_their_ranges(tmp_path: Path) -> None:
    ints = RNG.integers(0, 65536, (32, 32)).astype(np.int32)
    Image.fromarray(ints).save(tmp_path / "i.tif")
    assert np.array_equal(_shown(tmp_path / "i.tif"), _grey3(ints >> 8))
    floats = RNG.random((32, 32)).astype(np.float32)
    floats[0, :3] = 0, 1, 0.5
    Image.fromarray(floats).save(tmp_path / "f.tif")
    expected = _grey3(np.floor(floats.astype(np.float64) * 255 + 0.5))
    assert np.array_equal(_shown(tmp_path / "f.tif"), expected)
    assert expected[0, :3, 0].tolist() == [0, 255, 128]


@pytest.mark.parametrize("values,words", [
    (np.full((32, 32), 70_000, np.int32), "32-bit integer pixels from 70000 to 70000, outside"),
    (np.full((32, 32), -1, np.int32), "32-bit integer pixels from -1 to -1, outside"),
    (np.full((32, 32), 200.0, np.float32), "floating-point pixels (from 200 to 200) outside 0..1"),
    (np.array([[np.nan, 0.5] * 16] * 32, np.float32), "(from 0.5 to 0.5, not all of them numbers) outside 0..1"),
], ids=["int-above-16-bits", "int-negative", "float-0-255", "float-nan"])
def test_pixels_with_no_one_way_to_be_shown_are_refused_in_one_line(tmp_path: Path, values, words) -> None:
    path = tmp_path / "x.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(UserError) as e:
        load_image(path)
    assert str(e.value).startswith(f"{path}: ") and words in str(e.value) and "\n" not in str(e.value)


def test_predict_of_a_16_bit_png_gives_the_top5_of_the_same_8_bit_png(run_dir: Path, tmp_path: Path) -> None:
    eight = _u8(40, 48)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    sixteen = eight.astype(np.uint16) * 256 + _u8(40, 48)  # any low byte: the high byte is the picture
    _png16(tmp_path / "sixteen.png", sixteen, colour_type=0)
    checkpoint = str(next((run_dir / "checkpoints").glob("best.pt")))
    result = run_main("predict", "--checkpoint", checkpoint, str(tmp_path / "eight.png"),
                      str(tmp_path / "sixteen.png"), "--json")
    assert result.returncode == 0, result.stderr
    eight_top, sixteen_top = (p["top"] for p in json.loads(result.stdout))
    assert sixteen_top == eight_top


def test_predict_names_an_image_it_cannot_show_in_one_line(run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    Image.fromarray(np.full((32, 32), 200.0, np.float32)).save(path)
    checkpoint = str(run_dir / "checkpoints" / "training_checkpoint_10.pt")
    result = run_main("predict", "--checkpoint", checkpoint, str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert str(path) in one_error_line(result.stderr) and "outside 0..1" in result.stderr


# --- alpha and transparency: over white ------------------------------------------------------------------------------

def test_rgba_la_and_pa_are_composited_over_white(tmp_path: Path) -> None:
    rgba = _u8(32, 32, 4)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    shown = _shown(tmp_path / "rgba.png")
    assert np.array_equal(shown, _over_white(rgba[..., :3], rgba[..., 3]))
    assert shown[0, 0].tolist() == [255, 255, 255] and shown[0, 1].tolist() == rgba[0, 1, :3].tolist()
    la = _u8(32, 32, 2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.array_equal(_shown(tmp_path / "la.png"), _over_white(_grey3(la[..., 0]), la[..., 1]))
    palette, index, alpha = _u8(256, 3), _u8(32, 32), _u8(32, 32)
    pa = Image.frombytes("PA", (32, 32), np.stack([index, alpha], axis=2).tobytes())
    pa.putpalette(palette.tobytes())
    pa.save(tmp_path / "pa.tif")
    assert Image.open(tmp_path / "pa.tif").mode == "PA"
    assert np.array_equal(_shown(tmp_path / "pa.tif"), _over_white(palette[index], alpha))


def test_a_palette_with_transparency_shows_white_where_it_is_clear(tmp_path: Path) -> None:
    palette, index = _u8(256, 3), _u8(32, 32)
    per_index_alpha = _u8(256)
    per_index_alpha[:8] = 0, 255, 0, 128, 0, 1, 254, 0
    img = Image.frombytes("P", (32, 32), index.tobytes())
    img.putpalette(palette.tobytes())
    img.save(tmp_path / "p.png", transparency=per_index_alpha.tobytes())  # PNG tRNS: an alpha per index
    assert np.array_equal(_shown(tmp_path / "p.png"), _over_white(palette[index], per_index_alpha[index]))
    img.save(tmp_path / "p.gif", transparency=int(index[5, 5]))  # GIF: one index fully clear
    expected = palette[index].copy()
    expected[index == index[5, 5]] = 255
    assert np.array_equal(_shown(tmp_path / "p.gif"), expected)


def test_a_grey_or_rgb_colour_marked_transparent_is_white(tmp_path: Path) -> None:
    grey, rgb = _u8(32, 32), _u8(32, 32, 3)
    Image.fromarray(grey).save(tmp_path / "l.png", transparency=int(grey[2, 2]))
    expected = _grey3(grey)
    expected[grey == grey[2, 2]] = 255
    assert np.array_equal(_shown(tmp_path / "l.png"), expected)
    clear = tuple(int(v) for v in rgb[1, 1])
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=clear)
    expected = rgb.copy()
    expected[(rgb == clear).all(axis=2)] = 255
    assert np.array_equal(_shown(tmp_path / "rgb.png"), expected)


def test_premultiplied_alpha_is_composited_over_white(tmp_path: Path) -> None:
    """A TIFF with associated alpha (ExtraSamples 1), which PIL opens as straight RGBA, divided by alpha: over
    white it is c + 255 - a to within the level that division rounds away. The modes RGBa and La no file
    opens as (PIL makes them only in memory) are exact."""
    alpha = _u8(32, 32, 1)
    rgba = np.concatenate([(_u8(32, 32, 3).astype(np.uint32) * alpha // 255).astype(np.uint8), alpha], axis=2)
    expected = np.minimum(rgba[..., :3].astype(int) + 255 - alpha, 255)
    path = _tiff(tmp_path / "associated.tif", rgba, photometric=2, extra_samples=1)
    assert np.abs(_shown(path).astype(int) - expected).max() <= 1
    assert np.array_equal(np.asarray(viewer_rgb(Image.frombytes("RGBa", (32, 32), rgba.tobytes()))), expected)
    la = rgba[..., [0, 3]]
    shown = np.asarray(viewer_rgb(Image.frombytes("La", (32, 32), la.tobytes())))
    assert np.array_equal(shown, _grey3(np.minimum(la[..., 0].astype(int) + 255 - la[..., 1], 255)))


# --- other colour spaces ---------------------------------------------------------------------------------------------

def test_cmyk_is_255_minus_c_times_255_minus_k(tmp_path: Path) -> None:
    cmyk = _u8(32, 32, 4)
    Image.frombytes("CMYK", (32, 32), cmyk.tobytes()).save(tmp_path / "cmyk.tif")
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    assert np.array_equal(_shown(tmp_path / "cmyk.tif"), np.round((255 - c) * (255 - k) / 255))


def test_ycbcr_is_full_range_bt601(tmp_path: Path) -> None:
    ycc = _u8(32, 32, 3)
    Image.frombytes("YCbCr", (32, 32), ycc.tobytes()).save(tmp_path / "ycc.tif")
    assert Image.open(tmp_path / "ycc.tif").mode == "YCbCr"
    y, cb, cr = (ycc[..., i].astype(float) for i in range(3))
    expected = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                         y + 1.772 * (cb - 128)], axis=2).round().clip(0, 255)
    assert np.abs(_shown(tmp_path / "ycc.tif").astype(int) - expected).max() <= 1


def _cielab_d50_to_srgb(lightness: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CIE 1976 L*a*b* (D50) -> XYZ -> linear sRGB (Bradford-adapted to D50, as ICC profiles are) -> sRGB."""
    fy = (lightness * 100 / 255 + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * [0.9642, 1.0, 0.8249]
    linear = (xyz @ np.array([[3.1338561, -1.6168667, -0.4906146], [-0.9787684, 1.9161415, 0.0334540],
                              [0.0719453, -0.2289914, 1.4052427]]).T).clip(0, 1)
    return np.round(255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055))


def test_cielab_is_converted_to_srgb_colorimetrically(tmp_path: Path) -> None:
    """A CIELAB TIFF keeps a* and b* as signed bytes; PIL's own LAB -> RGB is off by up to 30 levels here."""
    lightness, a, b = RNG.integers(0, 256, (32, 32)), RNG.integers(-128, 128, (32, 32)), RNG.integers(-128, 128,
                                                                                                    (32, 32))
    raw = np.stack([lightness, a & 255, b & 255], axis=2).astype(np.uint8)
    Image.frombytes("LAB", (32, 32), raw.tobytes()).save(tmp_path / "lab.tif")
    assert Image.open(tmp_path / "lab.tif").mode == "LAB"
    assert np.abs(_shown(tmp_path / "lab.tif") - _cielab_d50_to_srgb(lightness, a, b)).max() <= 1


def test_hsv_bilevel_and_palette_images() -> None:
    """HSV has no file format: in memory, against Python's colorsys."""
    hsv = _u8(32, 32, 3)
    expected = np.array([[np.round(np.array(colorsys.hsv_to_rgb(*(p / 255))) * 255) for p in row] for row in hsv])
    assert np.abs(np.asarray(viewer_rgb(Image.frombytes("HSV", (32, 32), hsv.tobytes()))) - expected).max() <= 1
    bits = RNG.integers(0, 2, (32, 32)).astype(bool)
    assert np.array_equal(np.asarray(viewer_rgb(Image.fromarray(bits))), _grey3(bits * 255))
    palette, index = _u8(256, 3), _u8(32, 32)
    img = Image.frombytes("P", (32, 32), index.tobytes())
    img.putpalette(palette.tobytes())
    assert np.array_equal(np.asarray(viewer_rgb(img)), palette[index])


# --- orientation and frames ------------------------------------------------------------------------------------------

UPRIGHT = {  # EXIF orientation -> what a viewer does to the stored pixels to show them
    1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
    5: lambda a: np.rot90(np.fliplr(a), 1), 6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(np.fliplr(a), -1), 8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    stored = _u8(32, 48, 3)  # not square, so a quarter turn shows in the shape too
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
    assert np.array_equal(_shown(tmp_path / "o.png"), _centre(UPRIGHT[orientation](stored)))


def test_a_camera_jpeg_turned_a_quarter_is_shown_upright(tmp_path: Path) -> None:
    """Orientation 6 (the camera held turned right): the stored top-left quadrant is shown top-right."""
    colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], np.uint8)
    stored = colours.repeat(32, axis=0).repeat(32, axis=1)  # 64 x 64, four flat quadrants
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "camera.jpg", exif=exif, quality=95)
    shown = load_image(tmp_path / "camera.jpg").permute(1, 2, 0).numpy().astype(int)  # resized to 32 x 32
    expected = np.rot90(colours, -1)
    for row in range(2):
        for col in range(2):
            quadrant = shown[16 * row + 4:16 * row + 12, 16 * col + 4:16 * col + 12].reshape(-1, 3)
            assert np.abs(quadrant.mean(0) - expected[row, col]).max() < 8, (row, col)


def test_a_multi_frame_image_is_its_first_frame(tmp_path: Path) -> None:
    first, second = _u8(32, 32, 3), _u8(32, 32, 3)
    Image.fromarray(first).save(tmp_path / "two.tif", save_all=True, append_images=[Image.fromarray(second)])
    assert Image.open(tmp_path / "two.tif").n_frames == 2
    assert np.array_equal(_shown(tmp_path / "two.tif"), first)
    palette = np.zeros((256, 3), np.uint8)
    palette[1], palette[2] = (200, 10, 10), (10, 10, 200)
    frames = [Image.frombytes("P", (32, 32), bytes([i]) * 1024) for i in (1, 2)]
    for frame in frames:
        frame.putpalette(palette.tobytes())
    frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "two.gif").n_frames == 2
    assert (_shown(tmp_path / "two.gif").reshape(-1, 3) == [200, 10, 10]).all()

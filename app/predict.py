"""`python -m app predict`: the five most likely classes for image files of any size.

An image is first made what a viewer shows: turned upright by its EXIF orientation, its first frame
only, its pixels 8-bit RGB whatever mode PIL opens it in (`viewer_rgb` states the rules). The model was
trained on CIFAR's 8-bit RGB, and PIL's plain `convert("RGB")` is not what the user sees: it clips 16-bit
grey to near white and drops transparency, so the model would be shown a different picture. Pixels with
alpha are composited over white: that is what a viewer on a white page shows, and CIFAR images have no
alpha, so any one background is a choice; white is the common one. Its shorter side is then resized to
32 pixels (antialiased) and the centre 32x32 cropped, which keeps the aspect ratio the way a photo is
usually fitted to a square, and it is normalised exactly as the test set is.
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from torchvision.transforms import functional as TF

from app.augment import Normalize
from app.checkpoint import load_checkpoint, model_from_checkpoint
from app.device import resolve_device
from app.errors import UserError

SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")
PREMULTIPLIED = ("RGBa", "La")


class UnviewableImage(Exception):
    """Pixels with no one agreed way to show them as 8-bit RGB; the message says why, in a few words."""


def viewer_rgb(img: Image.Image) -> Image.Image:
    """The 8-bit RGB image a viewer shows for `img` (its orientation already applied), or UnviewableImage.

    Rules, mode by mode:
    - 16-bit grey (I;16, I;16B, I;16L, I;16N) keeps its high byte, value >> 8: that is how Pillow itself
      reduces a 16-bit colour PNG, TIFF or PPM when it opens one (as RGB or RGBA), so grey and colour
      16-bit images come out alike. A grey value marked transparent (PNG tRNS) is shown as white.
    - I (32-bit integers) is what Pillow opens a PGM with more than 8 bits as (scaled to 0..65535) and
      what older Pillows opened 16-bit PNGs as: values within 0..65535 follow the 16-bit rule; others
      have no meaning a viewer agrees on and are refused.
    - F (floating point) is read the way float images are kept, 0..1: value x 255, rounded half up.
      Values outside 0..1, NaN or infinite are refused for the same reason.
    - With alpha (LA, PA, RGBA, and 1, L, P or RGB with a colour marked transparent): straight alpha over
      white, (c * a + 255 * (255 - a)) / 255 rounded. Premultiplied (RGBa, La, made only in memory: PIL
      opens a TIFF with associated alpha as RGBA, divided by alpha): c + 255 - a.
    - LAB is CIELAB relative to D50 (the ICC and TIFF reading), converted to sRGB by LittleCMS without
      its precomputed 8-bit grid: PIL's own LAB -> RGB uses that grid and is off by up to 30 levels in
      dark channels.
    - 1, L, P, RGB, RGBX, CMYK, YCbCr and HSV: PIL's conversion, which is the standard rule for each:
      YCbCr is JPEG's full-range BT.601 (to within a level), CMYK (255 - c)(255 - k) / 255 (without a
      colour profile there is no other), HSV the usual hexcone.
    """
    mode = img.mode
    if mode in SIXTEEN_BIT_GREY or mode == "I":
        values = np.asarray(img)  # uint16 or int32: a large image stays a few bytes a pixel
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise UnviewableImage(f"32-bit integer pixels from {values.min()} to {values.max()}, outside a "
                                  f"16-bit image's 0..65535, have no one way to be shown; save it with 8 or 16 "
                                  f"bits per channel")
        grey = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2)
        transparent = img.info.get("transparency")
        if isinstance(transparent, int):
            grey[values == transparent] = 255
        return Image.fromarray(grey)
    if mode == "F":
        values = np.asarray(img)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            finite = values[np.isfinite(values)]
            span = f"from {finite.min():g} to {finite.max():g}" if finite.size else "none of them numbers"
            span += "" if finite.size in (0, values.size) else ", not all of them numbers"
            raise UnviewableImage(f"floating-point pixels ({span}) outside 0..1 have no one way to be shown; "
                                  f"save it with 8 or 16 bits per channel")
        grey = np.floor(values.astype(np.float64) * 255 + 0.5).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if mode in PREMULTIPLIED:
        pixels = np.asarray(img).astype(np.int16)
        colour, alpha = pixels[..., :-1], pixels[..., -1:]
        shown = np.minimum(colour + 255 - alpha, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(shown, 3, axis=2) if mode == "La" else shown)
    if img.has_transparency_data:
        rgba = np.asarray(img.convert("RGBA")).astype(np.uint16)  # c * a + 255 * (255 - a) <= 255 * 255
        colour, alpha = rgba[..., :3], rgba[..., 3:]
        return Image.fromarray(((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8))
    if mode == "LAB":
        return ImageCms.applyTransform(img, _lab_to_srgb())
    try:
        return img.convert("RGB")
    except ValueError:  # a mode PIL has no RGB conversion for
        raise UnviewableImage(f"pixels of mode {mode} cannot be converted to RGB") from None


@functools.cache
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB",
                                   flags=ImageCms.Flags.NOOPTIMIZE)


def read_image(path: Path) -> Image.Image:
    """The file's first frame, upright and 8-bit RGB as a viewer shows it (`viewer_rgb`), or a UserError
    naming the file.

    An image of more than Image.MAX_IMAGE_PIXELS pixels is refused from its header, before decoding:
    PIL refuses only above twice that, and in between warns and then decodes it whole.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # at its first frame
                return viewer_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UserError(f"{path}: image too large to decode safely (more than {Image.MAX_IMAGE_PIXELS:,} "
                        f"pixels); scale it down first") from None
    except UnviewableImage as e:
        raise UserError(f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: not an image that can be read (PNG or JPEG expected; {e.__class__.__name__})"
                        ) from None
    except ValueError as e:  # PIL's refusal of, say, a compressed text chunk too large to unpack
        raise UserError(f"{path}: not an image that can be read ({e})") from None


def load_image(path: Path) -> torch.Tensor:
    """A (3, 32, 32) uint8 tensor, or a UserError naming the file."""
    img = TF.resize(read_image(path), 32, antialias=True)
    return TF.pil_to_tensor(TF.center_crop(img, [32, 32]))


def predict(checkpoint: Path, images: list[Path], top: int = 5, device: str = "cpu") -> list[dict[str, Any]]:
    """`device`: auto (a GPU if there is one), cpu or cuda."""
    batch = torch.stack([load_image(p) for p in images])  # every file checked before any work
    dev = resolve_device(device)
    model, meta = model_from_checkpoint(checkpoint, load_checkpoint(checkpoint), dev)
    augment, classes = meta.config.augment, meta.classes
    with torch.no_grad():
        probs = model(Normalize(augment.mean, augment.std, dev)(batch.to(dev))).float().softmax(1)
    values, indices = probs.topk(top, dim=1)
    return [{"image": str(p), "top": [{"class": classes[i], "probability": v}
                                      for v, i in zip(vs.tolist(), ix.tolist())]}
            for p, vs, ix in zip(images, values, indices)]


def format_predictions(results: list[dict[str, Any]], as_json: bool) -> str:
    if as_json:
        return json.dumps(results)
    lines = []
    for r in results:
        lines.append(r["image"])
        lines += [f"  {k}. {t['class']:<20} {100 * t['probability']:6.2f}%" for k, t in enumerate(r["top"], 1)]
    return "\n".join(lines)

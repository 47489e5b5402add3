"""`python -m app predict`: the five most likely classes for image files of any size.

An image is converted to RGB, its shorter side resized to 32 pixels (antialiased) and the centre
32x32 cropped, which keeps the aspect ratio the way a photo is usually fitted to a square, then
normalised exactly as the test set is.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

from app.augment import Normalize
from app.checkpoint import load_checkpoint, model_from_checkpoint
from app.device import resolve_device
from app.errors import UserError


def load_image(path: Path) -> torch.Tensor:
    """A (3, 32, 32) uint8 tensor, or a UserError naming the file.

    An image of more than Image.MAX_IMAGE_PIXELS pixels is refused from its header, before decoding:
    PIL refuses only above twice that, and in between warns and then decodes it whole.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = img.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UserError(f"{path}: image too large to decode safely (more than {Image.MAX_IMAGE_PIXELS:,} "
                        f"pixels); scale it down first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: not an image that can be read (PNG or JPEG expected; {e.__class__.__name__})"
                        ) from None
    except ValueError as e:  # PIL's refusal of, say, a compressed text chunk too large to unpack
        raise UserError(f"{path}: not an image that can be read ({e})") from None
    img = TF.resize(img, 32, antialias=True)
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

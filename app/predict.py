"""`python -m app predict`: the most likely classes (`--topk`, five unless told) for images of any size.

Which files: each IMAGE argument in the order given, and for each
- a file: read whatever its extension; one that cannot be read ends the command, naming it;
- a folder: the files directly inside it (not its subfolders), sorted by name, whose extension is one
  PIL opens (`image_suffixes`, case aside); hidden files (a name starting with a dot) are left out;
- a pattern (a name with * ? or [ that is no file, quoted so the shell leaves it: 'photos/**/*.jpg',
  ** for any depth): the files it matches, sorted by path, with the same extension rule.
A folder or pattern with no image file is one error naming it. A file found in a folder or by a
pattern, rather than named, is not worth ending a run over thousands of images: if it cannot be read
it is skipped, with a warning on stderr naming it and why, and the count of every file skipped. A
folder or pattern none of whose image files could be read is an error again. Nothing is printed or
written until every image is read, so output is never partial; images go to the model `BATCH` at a
time, which bounds memory for a folder of any size.

Output: a list on stdout, or JSON (`--json`); `--csv PATH` writes a table instead, one row per image as
a spreadsheet user reads one: image, class_1, probability_1, ..., class_K, probability_K (probabilities
as fractions, like JSON's), written beside PATH and renamed onto it; stdout then says where, or holds
the JSON (with --json too). `--csv -` prints the table on stdout.

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

import csv
import functools
import glob
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, TextIO

import numpy as np
import torch
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.transforms import functional as TF

from app.augment import Normalize
from app.checkpoint import load_checkpoint, model_from_checkpoint
from app.device import resolve_device
from app.errors import ConfigError, UserError

SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")
PREMULTIPLIED = ("RGBa", "La")
BATCH = 256  # images per forward: a few MB whatever the folder's size, and few forwards
PATTERN = re.compile(r"[*?[]")  # what makes an IMAGE argument that names no file a pattern


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


@functools.cache
def image_suffixes() -> frozenset[str]:
    """The extensions (lower case, with their dot) of every format PIL decodes: what makes a file in a
    folder an image, so that a folder's notes, labels and sidecar files are not read as images. Left
    out: PIL's stubs (HDF5, GRIB, BUFR, WMF), which decode only with a handler installed from outside,
    and MPEG, of which PIL reads the size only. A file named on the command line is read whatever its
    extension."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt != "MPEG" and not _is_stub(Image.OPEN[fmt][0]))


def _is_stub(factory: Any) -> bool:
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


@dataclass(frozen=True)
class Source:
    """A file to predict. `found_by` is the folder or pattern that found it, None for a file named on the
    command line: a found file that cannot be read is skipped, a named one ends the command."""

    path: Path
    found_by: Optional[str] = None


@dataclass
class Found:
    """The files to predict, in order, and what the folders and patterns left out: a warning for each that
    found files of other types, and how many such files there were."""

    sources: list[Source]
    warnings: list[str]
    left_out: int


def find_images(arguments: Sequence[str]) -> Found:
    """The files of every IMAGE argument (the module's docstring states the rules); a UserError for an
    argument that names nothing or finds no image file."""
    result = Found([], [], 0)
    for argument in arguments:
        found = _found(argument)
        if found is None:
            result.sources.append(Source(Path(argument)))
            continue
        images = [f for f in found if f.suffix.lower() in image_suffixes()]
        others = [f.name for f in found if f.suffix.lower() not in image_suffixes()]
        if not images:
            raise UserError(_nothing_found(argument, len(others)))
        if others:
            names = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            result.warnings.append(f"{argument}: {_count(len(others), 'file')} skipped, not an image type by "
                                   f"extension ({names})")
            result.left_out += len(others)
        result.sources += [Source(f, argument) for f in images]
    return result


def _found(argument: str) -> Optional[list[Path]]:
    """The files a folder or pattern finds; None for a file named as it is."""
    path = Path(argument)
    if path.is_dir():
        return sorted((p for p in path.iterdir() if not p.name.startswith(".") and p.is_file()),
                      key=lambda p: p.name)
    if path.exists():
        return None
    if not PATTERN.search(argument):
        raise UserError(f"{argument}: no such file or folder")
    return sorted(Path(p) for p in glob.glob(argument, recursive=True) if os.path.isfile(p))


def _nothing_found(argument: str, others: int) -> str:
    other_files = f"only {_count(others, 'file')} of other types" if others else "no files"
    path = Path(argument)
    if not path.is_dir():
        return f"{argument}: no image file matches this pattern ({other_files})" if others else \
            f"{argument}: no file matches this pattern"
    subfolders = sum(1 for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    hint = f"; subfolders are not read (it has {subfolders}): name them, or a pattern such as " \
           f"'{path / '**' / '*.jpg'}'" if subfolders else ""
    return f"{argument}: no image files directly in this folder ({other_files}{hint})"


@dataclass(frozen=True)
class Predictor:
    """A checkpoint's model in eval mode, with the normalisation it was trained with and its class names."""

    model: torch.nn.Module
    normalize: Normalize
    classes: list[str]
    device: torch.device

    def top(self, images: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
        """Each image's `k` largest probabilities, largest first, and their classes' indices."""
        with torch.no_grad():
            probs = self.model(self.normalize(images.to(self.device))).float().softmax(1)
        values, indices = probs.topk(k, dim=1)
        return values.tolist(), indices.tolist()


def load_predictor(checkpoint: Path, device: str) -> Predictor:
    """`device`: auto (a GPU if there is one), cpu or cuda."""
    dev = resolve_device(device)
    model, meta, _ = model_from_checkpoint(checkpoint, load_checkpoint(checkpoint), dev)
    augment = meta.config.augment
    return Predictor(model, Normalize(augment.mean, augment.std, dev), meta.classes, dev)


def check_topk(topk: int, classes: int) -> None:
    """The bound the checkpoint sets; the flag's own lower bound, 1, is checked before torch is imported
    (app/cli.py)."""
    if topk > classes:
        raise ConfigError(f"--topk {topk}: must be from 1 to {classes}, the checkpoint's number of classes")


def predict(predictor: Predictor, sources: Sequence[Source], topk: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable image's `topk` classes, in order, and a warning for each found file skipped; a
    UserError for a named file that cannot be read, or a folder or pattern none of whose images can."""
    results: list[dict[str, Any]] = []
    skipped: dict[Source, str] = {}
    for start in range(0, len(sources), BATCH):
        read = _read(sources[start:start + BATCH], skipped)
        if read:
            values, indices = predictor.top(torch.stack(list(read.values())), topk)
            results += [{"image": str(s.path), "top": [{"class": predictor.classes[i], "probability": v}
                                                       for v, i in zip(vs, ix)]}
                        for s, vs, ix in zip(read, values, indices)]
    _check_each_found_one(sources, skipped)
    return results, list(skipped.values())


def _read(sources: Sequence[Source], skipped: dict[Source, str]) -> dict[Source, torch.Tensor]:
    """Each source's image, in order; a found one that cannot be read goes into `skipped` with its warning."""
    read = {}
    for source in sources:
        try:
            read[source] = load_image(source.path)
        except UserError as e:
            if source.found_by is None:
                raise
            skipped[source] = f"{e}; skipped"
    return read


def _check_each_found_one(sources: Sequence[Source], skipped: dict[Source, str]) -> None:
    found: dict[str, list[Source]] = {}
    for s in sources:
        if s.found_by is not None:
            found.setdefault(s.found_by, []).append(s)
    for argument, files in found.items():
        if all(f in skipped for f in files):
            raise UserError(f"{argument}: none of its {_count(len(files), 'image file')} could be read "
                            f"(the first: {skipped[files[0]].removesuffix('; skipped')})")


def format_text(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines.append(r["image"])
        lines += [f"  {k}. {t['class']:<20} {100 * t['probability']:6.2f}%" for k, t in enumerate(r["top"], 1)]
    return "\n".join(lines)


def csv_rows(results: list[dict[str, Any]], topk: int) -> Iterator[list[str]]:
    """A header, then one row per image: what a spreadsheet user sorts and filters by, one image a line."""
    yield ["image"] + [f"{column}_{rank}" for rank in range(1, topk + 1) for column in ("class", "probability")]
    for r in results:
        yield [r["image"]] + [v for t in r["top"] for v in (t["class"], f"{t['probability']:.6f}")]


def write_csv(results: list[dict[str, Any]], topk: int, out: TextIO) -> None:
    """Lines end in \\n: every spreadsheet and CSV reader takes it, and line tools see no stray \\r."""
    csv.writer(out, lineterminator="\n").writerows(csv_rows(results, topk))


def check_csv_destination(csv_path: Optional[str], as_json: bool) -> None:
    """Refuse --csv before any work, rather than after every image is read."""
    if csv_path is None:
        return
    if csv_path == "-":
        if as_json:
            raise ConfigError("--csv - and --json both print to stdout: give --csv a file, or leave out one")
        return
    path = Path(csv_path)
    if path.is_dir():
        raise ConfigError(f"--csv {csv_path}: is a folder; give the name of the file to write")
    if not path.parent.is_dir():
        raise ConfigError(f"--csv {csv_path}: folder {path.parent} does not exist")


def save_csv(results: list[dict[str, Any]], topk: int, path: Path) -> None:
    """Written beside PATH and renamed onto it: the file is a whole table or the one it was before. Names
    that are not UTF-8 keep their bytes."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(part, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            write_csv(results, topk, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise UserError(f"--csv {path}: cannot be written ({e.strerror or e})") from None


def run_predict(checkpoint: Path, images: Sequence[str], device: str, topk: int, as_json: bool,
                csv_path: Optional[str]) -> None:
    """Every check that can refuse the command (flags, paths, checkpoint) before an image is read; warnings
    on stderr, then the output, only once every image is read."""
    check_csv_destination(csv_path, as_json)
    found = find_images(images)
    predictor = load_predictor(checkpoint, device)
    check_topk(topk, len(predictor.classes))
    results, skipped = predict(predictor, found.sources, topk)
    for line in found.warnings + skipped:
        print(f"warning: {line}", file=sys.stderr)
    if found.left_out or skipped:
        print(f"warning: {_count(found.left_out + len(skipped), 'file')} skipped; "
              f"{_count(len(results), 'image')} predicted", file=sys.stderr)
    _output(results, topk, as_json, csv_path)


def _output(results: list[dict[str, Any]], topk: int, as_json: bool, csv_path: Optional[str]) -> None:
    if csv_path == "-":
        write_csv(results, topk, sys.stdout)
        return
    if csv_path is not None:
        save_csv(results, topk, Path(csv_path))
    if as_json:
        print(json.dumps(results))
    elif csv_path is not None:
        print(f"{csv_path}: the top {topk} classes of {_count(len(results), 'image')}")
    else:
        print(format_text(results))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

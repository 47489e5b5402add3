"""A confusion matrix that shows the confusions, as an image for TensorBoard and as a short list; and
the two figures read off it, per-class accuracy and the most confused pairs, for TensorBoard and
`python -m app evaluate` alike.

On a realistic CIFAR-100 matrix (70% on the diagonal, confusions of a few per cent) a single linear
colour scale spends its range on the diagonal and leaves a 6% cell almost white. So the two are shown
apart: the diagonal in blue, linear in per-class accuracy; every other cell in white-yellow-red, in
the share of its row (the true class) on a square-root scale that reaches its darkest at 25%, so 2%
is a clear light orange. Rows are true classes, columns predicted ones, both axes labelled, framed,
with ticks every 10 classes, a colour bar, and the ten most confused pairs written beside the matrix.
The text is in Aileron, the TrueType font that Pillow ships, at a size where a space is a space.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

OFF_DIAGONAL_CAP = 0.25  # shares at or above this get the darkest colour
OFF_COLOURS = ((255, 255, 255), (254, 217, 118), (253, 141, 60), (227, 26, 28), (128, 0, 38))
DIAGONAL_COLOURS = ((255, 255, 255), (158, 202, 225), (33, 113, 181), (8, 48, 107))
LEGEND_SHARES = (0.0, 0.02, 0.05, 0.1, 0.25)
FONT_SIZE, LINE, PAD = 13, 17, 4  # px: the text's size, the distance between its lines, the margin
LEFT, TOP = 64, 48  # px: where the matrix starts, right of the row axis's label and ticks, below the titles


def off_diagonal_level(share: np.ndarray | float) -> np.ndarray:
    """Where a share of the row falls on the off-diagonal colour bar, 0 to 1."""
    return np.sqrt(np.clip(np.asarray(share, dtype=np.float64) / OFF_DIAGONAL_CAP, 0.0, 1.0))


def ramp(level: np.ndarray, colours: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Levels in [0, 1] -> RGB uint8, interpolating linearly between evenly spaced colours."""
    stops = np.linspace(0.0, 1.0, len(colours))
    channels = [np.interp(level, stops, [c[i] for c in colours]) for i in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def row_shares(confusion: torch.Tensor) -> np.ndarray:
    m = confusion.detach().cpu().double().numpy()
    return m / np.maximum(m.sum(1, keepdims=True), 1)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Each true class's share of images predicted as itself (0 for a class with no images)."""
    confusion = confusion.detach().cpu()
    return confusion.diag().float() / confusion.sum(1).clamp(min=1).float()


def most_confused(confusion: torch.Tensor, k: int = 10) -> list[tuple[int, int, int, float]]:
    """The k largest off-diagonal cells: (true, predicted, images, share of the true class), by images,
    then share, then position."""
    counts = confusion.detach().cpu().long().numpy().copy()
    np.fill_diagonal(counts, 0)
    shares = row_shares(confusion)
    true, predicted = np.nonzero(counts)
    order = np.lexsort((predicted, true, -shares[true, predicted], -counts[true, predicted]))[:k]
    return [(int(true[o]), int(predicted[o]), int(counts[true[o], predicted[o]]), float(shares[true[o], predicted[o]]))
            for o in order]


def most_confused_table(pairs: Sequence[tuple[int, int, int, float]], names: Sequence[str]) -> str:
    """Markdown of `most_confused`'s pairs, for TensorBoard's text tab."""
    rows = [f"| {names[i]} | {names[j]} | {n} | {100 * share:.1f}% |" for i, j, n, share in pairs]
    return "\n".join(["| true class | predicted as | images | share of the true class |", "|---|---|---|---|", *rows]
                     if rows else ["no confusions"])


def label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Aileron Regular, the TrueType font that Pillow ships (drawn with FreeType, which Pillow's wheels
    have), at FONT_SIZE: at Pillow's default 10 px a space is a pixel or two and words run together, as
    they do in the bitmap font, which is what a Pillow without FreeType (or before 10.1, which cannot
    size the font) gets instead."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (ImportError, TypeError):
        return ImageFont.load_default()


def confusion_image(confusion: torch.Tensor, names: Sequence[str],
                    pairs: Sequence[tuple[int, int, int, float]]) -> torch.Tensor:
    """(3, H, W) floats in [0, 1]: the framed matrix with both axes labelled, its colour bars and `pairs`
    (`most_confused`). The matrix's top left corner is at (LEFT, TOP) for any number of classes."""
    n = len(confusion)
    cell = max(3, min(40, 600 // max(n, 1)))
    size = n * cell
    font = label_font()
    bar_x = LEFT + size + 24
    bar_width = max(font.getlength("off-diagonal"), 21 + font.getlength("100%"))  # its title, or its marks
    list_x = bar_x + round(bar_width) + 24
    titles = [f"rows: true class, columns: predicted class (classes 0..{n - 1})",
              "off the diagonal: share of the row (red, square-root scale); diagonal: accuracy (blue)"]
    lines = [f"{names[i][:14]} -> {names[j][:14]}: {100 * share:.1f}% ({count})" for i, j, count, share in pairs]
    list_width = max(font.getlength(line) for line in ["most confused (true -> predicted):", *lines])
    width = round(max(list_x + list_width, PAD + max(font.getlength(t) for t in titles))) + 2 * PAD
    height = TOP + max(size, 260) + 5 + 2 * LINE + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    shares = row_shares(confusion)
    cells = ramp(off_diagonal_level(shares), OFF_COLOURS)
    diagonal = ramp(np.clip(np.diag(shares), 0.0, 1.0), DIAGONAL_COLOURS)
    cells[np.arange(n), np.arange(n)] = diagonal
    matrix = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)
    canvas.paste(Image.fromarray(matrix), (LEFT, TOP))

    for row, title in enumerate(titles):
        draw.text((PAD, PAD + LINE * row), title, fill="black", font=font)
    draw.rectangle((LEFT - 1, TOP - 1, LEFT + size, TOP + size), outline="black")
    for k in range(0, n + 1, 10):
        p = k * cell
        draw.line((LEFT + p, TOP + size, LEFT + p, TOP + size + 4), fill="black")  # x ticks
        draw.line((LEFT - 5, TOP + p, LEFT - 1, TOP + p), fill="black")  # y ticks
        if k < n:
            draw.text((LEFT + p + 1, TOP + size + 5), str(k), fill="black", font=font)
            _text_at_middle(draw, (LEFT - 8 - font.getlength(str(k)), TOP + p), str(k), font)
    label_width = font.getlength("predicted class")
    draw.text((LEFT + (size - label_width) / 2, TOP + size + 5 + LINE), "predicted class", fill="black", font=font)
    _vertical_text(canvas, (PAD, TOP + size / 2), "true class", font)

    _colour_bar(draw, canvas, bar_x, TOP, "off-diagonal", LEGEND_SHARES,
                lambda s: float(off_diagonal_level(s)), OFF_COLOURS, font)
    _colour_bar(draw, canvas, bar_x, TOP + 170, "diagonal", (0.0, 0.5, 1.0), lambda s: s, DIAGONAL_COLOURS, font,
                height=60)

    draw.text((list_x, TOP), "most confused (true -> predicted):", fill="black", font=font)
    for row, line in enumerate(lines):
        draw.text((list_x, TOP + LINE * (row + 1)), line, fill="black", font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255


def _text_at_middle(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
                    font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> None:
    """`text` from x with its digits' middle at y, so that a tick's label is level with its tick (text
    is placed by its top, which lies above the digits by an amount that depends on the font)."""
    _, top, _, bottom = font.getbbox("0")
    draw.text((xy[0], xy[1] - (top + bottom) / 2), text, fill="black", font=font)


def _vertical_text(canvas: Image.Image, xy: tuple[float, float], text: str,
                   font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> None:
    """`text` read from bottom to top, from x and centred on y: the row axis's label, beside the axis
    as on a plot (Pillow draws text only horizontally, so it is drawn apart and turned)."""
    _, _, right, bottom = font.getbbox(text)
    label = Image.new("L", (int(right) + 1, int(bottom) + 1), 0)
    ImageDraw.Draw(label).text((0, 0), text, fill=255, font=font)
    label = label.rotate(90, expand=True)
    x, y = round(xy[0]), round(xy[1] - label.height / 2)
    canvas.paste((0, 0, 0), (x, y, x + label.width, y + label.height), mask=label)


def _colour_bar(draw: ImageDraw.ImageDraw, canvas: Image.Image, x: int, y: int, title: str,
                marks: Sequence[float], level, colours, font, height: int = 120) -> None:
    """A vertical bar, 0 at the bottom, with its marks labelled in per cent."""
    draw.text((x, y), title, fill="black", font=font)
    top = y + LINE + 6  # room for the top mark's label, which is centred on it
    levels = np.linspace(1.0, 0.0, height)[:, None].repeat(14, 1)
    canvas.paste(Image.fromarray(ramp(levels, colours)), (x, top))
    draw.rectangle((x - 1, top - 1, x + 14, top + height), outline="black")
    for mark in marks:
        yy = top + round((1.0 - level(mark)) * (height - 1))
        draw.line((x + 14, yy, x + 18, yy), fill="black")
        _text_at_middle(draw, (x + 21, yy), f"{100 * mark:g}%", font)

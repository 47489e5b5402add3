"""A confusion matrix that shows the confusions, as an image for TensorBoard and as a short list; and
the two figures read off it, per-class accuracy and the most confused pairs, for TensorBoard and
`python -m app evaluate` alike.

On a realistic CIFAR-100 matrix (70% on the diagonal, confusions of a few per cent) a single linear
colour scale spends its range on the diagonal and leaves a 6% cell almost white. So the two are shown
apart: the diagonal in blue, linear in per-class accuracy; every other cell in white-yellow-red, in
the share of its row (the true class) on a square-root scale that reaches its darkest at 25%, so 2%
is a clear light orange. Rows are true classes, columns predicted ones, framed, with ticks every 10
classes, a colour bar, and the ten most confused pairs written beside the matrix.
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


def confusion_image(confusion: torch.Tensor, names: Sequence[str],
                    pairs: Sequence[tuple[int, int, int, float]]) -> torch.Tensor:
    """(3, H, W) floats in [0, 1]: the framed matrix, its colour bars and `pairs` (`most_confused`)."""
    n = len(confusion)
    cell = max(3, min(40, 600 // max(n, 1)))
    size = n * cell
    font = ImageFont.load_default()
    left, top, bottom = 46, 40, 40
    bar_x = left + size + 24
    list_x = bar_x + 110
    width, height = list_x + 330, top + max(size, 230) + bottom
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    shares = row_shares(confusion)
    cells = ramp(off_diagonal_level(shares), OFF_COLOURS)
    diagonal = ramp(np.clip(np.diag(shares), 0.0, 1.0), DIAGONAL_COLOURS)
    cells[np.arange(n), np.arange(n)] = diagonal
    matrix = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)
    canvas.paste(Image.fromarray(matrix), (left, top))

    draw.text((4, 4), f"rows: true class, columns: predicted class (classes 0..{n - 1})", fill="black", font=font)
    draw.text((4, 18), "off the diagonal: share of the row (red, square-root scale); diagonal: accuracy (blue)",
              fill="black", font=font)
    draw.rectangle((left - 1, top - 1, left + size, top + size), outline="black")
    for k in range(0, n + 1, 10):
        p = k * cell
        draw.line((left + p, top + size, left + p, top + size + 4), fill="black")  # x ticks
        draw.line((left - 5, top + p, left - 1, top + p), fill="black")  # y ticks
        if k < n:
            draw.text((left + p + 1, top + size + 5), str(k), fill="black", font=font)
            draw.text((left - 8 - 6 * len(str(k)), top + p), str(k), fill="black", font=font)
    draw.text((left, top + size + 20), "predicted class", fill="black", font=font)

    _colour_bar(draw, canvas, bar_x, top, "off-diagonal", LEGEND_SHARES,
                lambda s: float(off_diagonal_level(s)), OFF_COLOURS, font)
    _colour_bar(draw, canvas, bar_x, top + 150, "diagonal", (0.0, 0.5, 1.0), lambda s: s, DIAGONAL_COLOURS, font,
                height=60)

    draw.text((list_x, top), "most confused (true -> predicted):", fill="black", font=font)
    for row, (i, j, count, share) in enumerate(pairs):
        line = f"{names[i][:14]} -> {names[j][:14]}: {100 * share:.1f}% ({count})"
        draw.text((list_x, top + 16 * (row + 1)), line, fill="black", font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255


def _colour_bar(draw: ImageDraw.ImageDraw, canvas: Image.Image, x: int, y: int, title: str,
                marks: Sequence[float], level, colours, font, height: int = 120) -> None:
    """A vertical bar, 0 at the bottom, with its marks labelled in per cent."""
    draw.text((x, y), title, fill="black", font=font)
    top = y + 14
    levels = np.linspace(1.0, 0.0, height)[:, None].repeat(14, 1)
    canvas.paste(Image.fromarray(ramp(levels, colours)), (x, top))
    draw.rectangle((x - 1, top - 1, x + 14, top + height), outline="black")
    for mark in marks:
        yy = top + round((1.0 - level(mark)) * (height - 1))
        draw.line((x + 14, yy, x + 18, yy), fill="black")
        draw.text((x + 21, yy - 5), f"{100 * mark:g}%", fill="black", font=font)

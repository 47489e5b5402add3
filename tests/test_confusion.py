"""The confusion-matrix image shows confusions: on a realistic matrix (70% on the diagonal) a 2% cell is
clearly coloured, empty cells are white, the diagonal is apart, and the most confused pairs are listed;
its text keeps its spaces and both axes say what they are."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from handlers.confusion import LEFT, LINE, TOP, confusion_image, label_font, most_confused, most_confused_table

N, CELL = 100, 6  # 100 classes: cells of 6 pixels


def _matrix() -> torch.Tensor:
    m = torch.zeros(N, N, dtype=torch.long)
    m.fill_diagonal_(70)
    m[3, 7], m[5, 9], m[8, 1] = 2, 6, 6  # 2%, 6%, 6% of rows of 100 images (70 + 30 elsewhere)
    for i in range(N):
        m[i, (i + 50) % N] += 100 - int(m[i].sum())  # the rest of each row in one far cell
    return m


def _pixel(image: torch.Tensor, row: int, column: int) -> list[int]:
    y, x = TOP + row * CELL + CELL // 2, LEFT + column * CELL + CELL // 2
    return [round(255 * float(v)) for v in image[:, y, x]]


def test_a_two_percent_confusion_is_clearly_coloured_and_an_empty_cell_white() -> None:
    m = _matrix()
    names = [f"class_{i:02d}" for i in range(N)]
    image = confusion_image(m, names, most_confused(m))
    assert image.shape[0] == 3 and image.shape[1] >= 600 and image.shape[2] >= 600
    r, g, b = _pixel(image, 3, 7)
    assert r > 240 and b < 150  # orange-yellow, far from white
    assert _pixel(image, 3, 8) == [255, 255, 255]
    r, g, b = _pixel(image, 10, 10)  # the diagonal: blue, apart from the red scale
    assert b > r + 100
    assert _pixel(image, 5, 9)[2] < _pixel(image, 3, 7)[2]  # 6% darker than 2%


def test_the_most_confused_pairs_come_by_images_then_share() -> None:
    m = _matrix()
    pairs = most_confused(m, k=3)
    assert (pairs[0][0], pairs[0][1], pairs[0][2]) == (0, 50, 30)  # the largest, the lowest row of the ties
    six = [(i, j, n) for i, j, n, _ in most_confused(m, k=N + 10) if n == 6]
    assert six == [(5, 9, 6), (8, 1, 6)]
    table = most_confused_table(pairs, [f"c{i}" for i in range(N)])
    assert table.splitlines()[0] == "| true class | predicted as | images | share of the true class |"
    assert len(table.splitlines()) == 5


def _ink(image: torch.Tensor) -> np.ndarray:
    """Where a (3, H, W) image is dark: text and lines."""
    return (image.numpy().max(axis=0) < 0.5)


def _gap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    """The widest run of blank columns inside `text` as drawn."""
    canvas = Image.new("L", (200, 40), 255)
    ImageDraw.Draw(canvas).text((4, 4), text, fill=0, font=font)
    columns = (np.array(canvas) < 128).any(axis=0)
    inked = np.flatnonzero(columns)
    widest = run = 0
    for dark in columns[inked[0]: inked[-1] + 1]:
        run = 0 if dark else run + 1
        widest = max(widest, run)
    return widest


def test_the_text_keeps_its_spaces() -> None:
    """Pillow's default font (Aileron at 10 px, or its bitmap font) drew "most confused" as "mostconfused"."""
    font = label_font()
    assert isinstance(font, ImageFont.FreeTypeFont)
    for spaced, joined in (("t c", "tc"), ("e c", "ec"), ("a b", "ab")):
        assert _gap(spaced, font) >= _gap(joined, font) + 3 and _gap(spaced, font) >= 4, spaced
    assert _gap("t c", ImageFont.load_default(size=10)) < 4  # what the images had


def test_both_axes_are_labelled() -> None:
    """"true class" beside the rows, read upwards, and "predicted class" under the columns."""
    m = _matrix()
    ink = _ink(confusion_image(m, [f"c{i}" for i in range(N)], most_confused(m)))
    size, font = N * CELL, label_font()
    rows = np.flatnonzero(ink[TOP: TOP + size, : LEFT - 30].any(axis=1))  # left of the ticks' labels
    columns = np.flatnonzero(ink[TOP: TOP + size, : LEFT - 30].any(axis=0))
    assert rows.size and rows[-1] - rows[0] >= 0.9 * font.getlength("true class")  # as long as the words
    assert columns[-1] - columns[0] <= LINE  # and one line wide: upright
    assert abs((rows[0] + rows[-1]) / 2 - size / 2) <= 2  # level with the middle of the rows
    below = ink[TOP + size + 5 + LINE: TOP + size + 5 + 2 * LINE, LEFT: LEFT + size]
    columns = np.flatnonzero(below.any(axis=0))
    assert columns[-1] - columns[0] >= 0.9 * font.getlength("predicted class")
    assert abs((columns[0] + columns[-1]) / 2 - size / 2) <= 2  # under the middle of the columns

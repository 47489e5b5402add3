"""The confusion-matrix image shows confusions: on a realistic matrix (70% on the diagonal) a 2% cell is
clearly coloured, empty cells are white, the diagonal is apart, and the most confused pairs are listed."""
from __future__ import annotations

import torch

from handlers.confusion import confusion_image, most_confused, most_confused_table

N, CELL, LEFT, TOP = 100, 6, 46, 40  # confusion_image's layout for 100 classes


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

"""`predict` over many images as a user gives them: files, folders and patterns in the order given,
`--topk K`, a CSV table a spreadsheet opens, batches of bounded size; a file found in a folder that
cannot be read skipped with a warning and counted, a named one ending the command before any output.
Every image is a real PNG or JPEG written with PIL; the checkpoint is the finished run's."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app.predict
from tests.support import one_error_line, run_main

RNG = np.random.default_rng(19)


LOADED: dict[tuple[Path, str], app.predict.Predictor] = {}


@pytest.fixture
def checkpoint(finished_run, monkeypatch: pytest.MonkeyPatch) -> str:
    """A checkpoint of the finished run, built into a model once for all these tests: what they check is
    which files are read and what is written, not the loading (tests/test_inspect.py), which would
    otherwise be most of their time."""
    load = app.predict.load_predictor

    def loaded_once(path: Path, device: str) -> app.predict.Predictor:
        if (path, device) not in LOADED:
            LOADED[path, device] = load(path, device)
        return LOADED[path, device]

    monkeypatch.setattr(app.predict, "load_predictor", loaded_once)
    return str(sorted((finished_run.run_dir / "checkpoints").glob("*.pt"))[0])


def _image(path: Path, fmt: str | None = None) -> Path:
    """A random 40x36 colour picture: different pictures, different predictions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def _predict_json(checkpoint: str, *args: str) -> list[dict]:
    result = run_main("predict", "--checkpoint", checkpoint, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _same_tops(a: list[dict], b: list[dict]) -> None:
    """The same classes in the same order, probabilities equal to float noise (another batch, another sum order)."""
    assert [[t["class"] for t in r["top"]] for r in a] == [[t["class"] for t in r["top"]] for r in b]
    assert np.allclose([[t["probability"] for t in r["top"]] for r in a],
                       [[t["probability"] for t in r["top"]] for r in b], atol=1e-5)


def test_a_folder_is_its_image_files_sorted_by_name_in_the_order_of_the_arguments(checkpoint: str,
                                                                                 tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for name in ("b.png", "a.jpg", "C.PNG", ".hidden.png", "sub/d.png"):
        _image(photos / name, "PNG" if name.lower().endswith("png") else "JPEG")
    (photos / "notes.txt").write_text("not a picture")
    before, after = _image(tmp_path / "before.png"), _image(tmp_path / "after.dat", "PNG")  # named: any extension
    in_folder = [str(photos / n) for n in ("C.PNG", "a.jpg", "b.png")]
    predictions = _predict_json(checkpoint, str(before), str(photos), str(after), *in_folder)
    assert [p["image"] for p in predictions] == [str(before), *in_folder, str(after), *in_folder]
    _same_tops(predictions[1:4], predictions[5:])  # each file of the folder predicted as itself
    assert all(len(p["top"]) == 5 for p in predictions)


def test_a_folder_with_no_images_is_one_error_naming_it(checkpoint: str, tmp_path: Path) -> None:
    empty, others = tmp_path / "empty", tmp_path / "others"
    empty.mkdir()
    (others / "labels").mkdir(parents=True)
    _image(others / "labels" / "x.png")
    (others / "notes.txt").write_text("not a picture")
    for folder, words in ((empty, "(no files)"), (others, f"subfolders are not read (it has 1): name them, or a "
                                                          f"pattern such as '{others}/**/*.jpg'")):
        result = run_main("predict", "--checkpoint", checkpoint, str(folder))
        line = one_error_line(result.stderr)
        assert result.returncode == 1 and result.stdout == ""
        assert line.startswith(f"error: {folder}: no image files directly in this folder") and words in line, line


def test_a_pattern_takes_the_image_files_it_matches_at_any_depth(checkpoint: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    files = [_image(data / name) for name in ("cat/2.png", "cat/1.png", "dog/deep/3.png", "top.png")]
    _image(data / "cat" / "4.jpg", "JPEG")
    predictions = _predict_json(checkpoint, f"{data}/**/*.png")
    assert [p["image"] for p in predictions] == [str(files[i]) for i in (1, 0, 2, 3)]
    nothing = run_main("predict", "--checkpoint", checkpoint, f"{data}/*.gif")
    assert nothing.returncode == 1 and one_error_line(nothing.stderr) == \
        f"error: {data}/*.gif: no file matches this pattern"
    missing = run_main("predict", "--checkpoint", checkpoint, str(tmp_path / "nowhere"))
    assert one_error_line(missing.stderr) == f"error: {tmp_path / 'nowhere'}: no such file or folder"


def test_an_unreadable_file_in_a_folder_is_skipped_with_a_warning_and_counted(checkpoint: str,
                                                                             tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    good = [_image(photos / "a.png"), _image(photos / "c.jpg", "JPEG")]
    (photos / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (photos / "notes.txt").write_text("not a picture")
    result = run_main("predict", "--checkpoint", checkpoint, str(photos), "--json")
    assert result.returncode == 0, result.stderr
    assert [p["image"] for p in json.loads(result.stdout)] == [str(f) for f in good]
    warnings = result.stderr.splitlines()
    assert f"warning: {photos}: 1 file skipped, not an image type by extension (notes.txt)" in warnings
    assert any(w.startswith(f"warning: {photos / 'b.png'}: not an image that can be read") for w in warnings)
    assert warnings[-1] == "warning: 2 files skipped; 2 images predicted"


def test_a_named_file_that_cannot_be_read_ends_the_command_before_any_output(checkpoint: str,
                                                                            tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _image(photos / "a.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    table = tmp_path / "out.csv"
    table.write_text("the table of yesterday\n")
    result = run_main("predict", "--checkpoint", checkpoint, str(photos), str(bad), "--csv", str(table))
    assert result.returncode == 1 and result.stdout == ""
    assert str(bad) in one_error_line(result.stderr)
    assert table.read_text() == "the table of yesterday\n" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["bad.png", "out.csv", "photos"]


def test_a_folder_none_of_whose_images_can_be_read_is_an_error(checkpoint: str, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.jpg"):
        (photos / name).write_bytes(b"garbage")
    result = run_main("predict", "--checkpoint", checkpoint, str(photos))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(f"error: {photos}: none of its 2 image files could be read "
                                                     f"(the first: {photos / 'a.png'}: not an image")


def test_topk_gives_k_classes_and_refuses_values_outside_the_checkpoints_classes(checkpoint: str,
                                                                                tmp_path: Path) -> None:
    image = str(_image(tmp_path / "a.png"))
    every = _predict_json(checkpoint, image, "--topk", "100")[0]["top"]
    assert len({t["class"] for t in every}) == 100 and sum(t["probability"] for t in every) == pytest.approx(1)
    text = run_main("predict", "--checkpoint", checkpoint, image, "--topk", "2").stdout.splitlines()
    assert text[0] == image and [line.split()[:2] for line in text[1:]] == [["1.", every[0]["class"]],
                                                                            ["2.", every[1]["class"]]]
    for bad, words in (("0", "--topk 0: must be at least 1"), ("101", "--topk 101: must be from 1 to 100"),
                       ("many", "argument --topk: invalid int value: 'many'")):
        result = run_main("predict", "--checkpoint", checkpoint, image, "--topk", bad)
        assert result.returncode == 2 and result.stdout == "" and words in one_error_line(result.stderr)


def test_csv_is_one_row_per_image_with_rank_columns_a_spreadsheet_opens(checkpoint: str, tmp_path: Path) -> None:
    images = [str(_image(tmp_path / "a,b.png")), str(_image(tmp_path / 'say "c".jpg', "JPEG"))]
    table = tmp_path / "predictions.csv"
    result = run_main("predict", "--checkpoint", checkpoint, *images, "--topk", "3", "--csv", str(table), "--json")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)  # --json still prints; the table goes to the file
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3"]
    assert [r[0] for r in rows[1:]] == images
    for row, p in zip(rows[1:], predictions):
        assert row[1::2] == [t["class"] for t in p["top"]]
        assert [float(v) for v in row[2::2]] == pytest.approx([t["probability"] for t in p["top"]], abs=1e-6)
    alone = run_main("predict", "--checkpoint", checkpoint, *images, "--csv", str(table))
    assert alone.stdout == f"{table}: the top 5 classes of 2 images\n" and len(next(csv.reader(open(table)))) == 11


def test_csv_dash_prints_the_table_and_bad_destinations_are_refused_first(checkpoint: str, tmp_path: Path) -> None:
    image = str(_image(tmp_path / "a.png"))
    printed = run_main("predict", "--checkpoint", checkpoint, image, "--csv", "-")
    assert printed.returncode == 0 and "\r" not in printed.stdout
    assert [r[0] for r in csv.reader(io.StringIO(printed.stdout))] == ["image", image]
    for flags, words in ((["--csv", "-", "--json"], "--csv - and --json both print to stdout"),
                         (["--csv", str(tmp_path / "no" / "t.csv")], f"folder {tmp_path / 'no'} does not exist"),
                         (["--csv", str(tmp_path)], f"--csv {tmp_path}: is a folder")):
        result = run_main("predict", "--checkpoint", "no-such.pt", image, *flags)  # refused before the checkpoint
        assert result.returncode == 2 and result.stdout == "" and words in one_error_line(result.stderr)


def test_many_images_go_to_the_model_in_batches_of_bounded_size(checkpoint: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    photos = tmp_path / "photos"
    for i in range(7):
        _image(photos / f"{i}.png")
    (photos / "4.png").write_bytes(b"garbage")  # skipped: its batch is one image smaller
    at_once = _predict_json(checkpoint, str(photos))
    batches: list[int] = []
    top = app.predict.Predictor.top
    monkeypatch.setattr(app.predict, "BATCH", 3)
    monkeypatch.setattr(app.predict.Predictor, "top", lambda self, images, k: batches.append(len(images))
                        or top(self, images, k))
    in_threes = _predict_json(checkpoint, str(photos))
    assert batches == [3, 2, 1] and [p["image"] for p in in_threes] == [str(photos / f"{i}.png") for i in
                                                                        (0, 1, 2, 3, 5, 6)]
    _same_tops(in_threes, at_once)

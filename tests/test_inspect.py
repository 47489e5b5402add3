"""After a run: `python -m app evaluate` and `python -m app predict` on its checkpoints (in this process
through main(), but for what only a process shows: several of them, and a closed pipe)."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from app.augment import Normalize
from app.checkpoint import load_checkpoint, model_from_checkpoint
from app.errors import UserError
from app.evaluate import format_report
from app.predict import load_image
from handlers.metrics_csv import read_metrics_csv
from tests.conftest import FinishedRun
from tests.support import ROOT, TEST_IMAGES, one_error_line, run_app, run_main
from tests.test_cli_errors import run_into_closed_pipe


@pytest.fixture
def run_dir(finished_run) -> Path:
    return finished_run.run_dir


def _evaluate(*args: str, process: bool = False) -> dict:
    ran = (run_app if process else run_main)("evaluate", *args, "--json", "--device", "cpu")
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


def test_evaluate_gives_the_numbers_training_logged(run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    best = run_dir / "checkpoints" / "best.pt"
    for checkpoint, logged in ((best, results["best"]),
                               (run_dir / "checkpoints" / "training_checkpoint_10.pt", results["final"])):
        report = _evaluate("--checkpoint", str(checkpoint))
        assert report["weights"] == "model"
        assert report["top1"] == logged["top1"] and report["top5"] == logged["top5"]
        assert report["loss"] == pytest.approx(logged["loss"], rel=1e-6)
        assert (report["epoch"], report["iteration"]) == (logged["epoch"], 5 * logged["epoch"])
        if checkpoint == best:  # what training measured when it saved the best model, kept in its meta
            assert report["saved_metrics"] == {k: v for k, v in logged.items() if k != "epoch"}
    assert report["saved_metrics"] is None and report["images"] == TEST_IMAGES
    text = run_main("evaluate", "--checkpoint", str(best), "--device", "cpu").stdout
    assert text.splitlines()[0] == f"{best} (epoch {results['best']['epoch']}, iteration " \
                                   f"{5 * results['best']['epoch']}), model weights, {TEST_IMAGES} test images"
    per_class = report["per_class_accuracy"]
    assert all(name.startswith("class_") for name in per_class)
    worst = [w["accuracy"] for w in report["worst_classes"]]
    assert len(worst) == 10 and worst == sorted(worst)
    counts = [c["count"] for c in report["most_confused"]]
    assert counts == sorted(counts, reverse=True) and all(c["true"] != c["predicted"] for c in report["most_confused"])


@pytest.mark.slow  # the EMA run's training, which tests/test_ema.py's slow tests share
def test_evaluate_ema_gives_the_figures_the_emas_evaluation_logged(ema_run: FinishedRun) -> None:
    """`--ema` of each epoch's training checkpoint: metrics.csv's ema_* figures of that epoch (those of the EMA's
    evaluator in training), which are not the raw model's val_*; the report says it evaluated the EMA. The best
    model of a run that chose it by the EMA holds the EMA's weights, says so, and refuses `--ema` in one line."""
    rows = read_metrics_csv(ema_run.run_dir / "metrics.csv")
    assert all(row["ema_loss"] != row["val_loss"] for row in rows)  # two models: the flag picks one
    for row in rows:
        checkpoint = ema_run.run_dir / "checkpoints" / f"training_checkpoint_{row['iteration']}.pt"
        report = _evaluate("--checkpoint", str(checkpoint), "--ema")
        assert (report["weights"], report["epoch"]) == ("ema", int(row["epoch"]))
        assert (report["top1"], report["top5"]) == (float(row["ema_top1"]), float(row["ema_top5"]))
        assert report["loss"] == pytest.approx(float(row["ema_loss"]), rel=1e-6)
        assert format_report(report).splitlines()[0] == \
            f"{checkpoint} (epoch {row['epoch']}, iteration {row['iteration']}), EMA weights, {TEST_IMAGES} test images"
    best = ema_run.run_dir / "checkpoints" / "best.pt"
    assert model_from_checkpoint(best, load_checkpoint(best), torch.device("cpu"))[2] == "ema"
    refused = run_main("evaluate", "--checkpoint", str(best), "--ema", "--device", "cpu")
    assert (refused.returncode, refused.stdout) == (2, "")
    assert one_error_line(refused.stderr) == f"error: {best}: --ema: a best model holds one set of weights, here " \
                                             f"the EMA's (ema.select_best \"ema\"): evaluate it without --ema"


def test_evaluate_ema_of_a_checkpoint_without_an_ema_is_one_line(run_dir: Path) -> None:
    """A run without the EMA: neither its training checkpoint nor its best model holds one; exit 2, nothing
    evaluated, the file and the flag named."""
    for name, why in (("training_checkpoint_10.pt", "this training checkpoint holds no EMA weights (its run had "
                                                    "no EMA: ema.decay off)"),
                      ("best.pt", "a best model holds no EMA weights, and this one's run had no EMA (ema.decay off)")):
        checkpoint = run_dir / "checkpoints" / name
        refused = run_main("evaluate", "--checkpoint", str(checkpoint), "--ema", "--json", "--device", "cpu")
        assert (refused.returncode, refused.stdout) == (2, "")
        assert one_error_line(refused.stderr) == f"error: {checkpoint}: --ema: {why}"


def readme_block(after: str) -> str:
    """The first python block of README.md after the line `after`."""
    text = (ROOT / "README.md").read_text()
    return text[text.index(after):].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readmes_plain_torchvision_recipe_loads_the_best_model_as_trained(run_dir: Path) -> None:
    """README, Using the trained model elsewhere: its code, run as written on a run's best.pt, gives the
    logits of the project's own model; without its max-pool line the weights still load, and the
    logits differ (what the README warns of)."""
    code = readme_block("### Using the trained model elsewhere")
    best = run_dir / "checkpoints" / "best.pt"
    assert code.count("runs/NAME/checkpoints/best.pt") == 1
    code = code.replace("runs/NAME/checkpoints/best.pt", str(best))
    pixels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = pixels.float() / 255  # what the README's predict() takes
    ours, meta, _ = model_from_checkpoint(best, load_checkpoint(best), torch.device("cpu"))
    x = Normalize(meta.config.augment.mean, meta.config.augment.std)(pixels)  # what evaluate and predict feed it
    readme: dict = {}
    exec(code, readme)  # noqa: S102 - the README's own block, as a user would paste it
    with torch.no_grad():
        expected = ours(x)
        assert torch.allclose(readme["model"](x), expected, atol=1e-5)
        assert not torch.equal(expected[0], expected[1])  # a trained model tells the images apart
    assert readme["predict"](images) == [meta.classes[i] for i in expected.argmax(1).tolist()]
    with_pool: dict = {}
    exec(code.replace("model.maxpool = nn.Identity()", "pass"), with_pool)  # noqa: S102
    with torch.no_grad():
        assert with_pool["model"](x).shape == expected.shape
        assert not torch.allclose(with_pool["model"](x), expected, atol=1e-3)


@pytest.mark.slow
def test_evaluate_under_two_processes_gives_the_same_numbers(run_dir: Path) -> None:
    checkpoint = str(run_dir / "checkpoints" / "training_checkpoint_10.pt")
    alone = _evaluate("--checkpoint", checkpoint)
    split = _evaluate("--checkpoint", checkpoint, "--nproc-per-node", "2", "--backend", "gloo", process=True)
    assert {k: split[k] for k in ("top1", "top5", "per_class_accuracy", "most_confused")} == \
           {k: alone[k] for k in ("top1", "top5", "per_class_accuracy", "most_confused")}
    assert split["loss"] == pytest.approx(alone["loss"], rel=1e-6)


def test_evaluate_report_reads_well(run_dir: Path) -> None:
    result = run_main("evaluate", "--checkpoint", str(run_dir / "checkpoints" / "training_checkpoint_10.pt"),
                      "--device", "cpu")
    assert result.returncode == 0
    for heading in ("top-1", "ten worst classes:", "most confused (true -> predicted):", "per-class accuracy:"):
        assert heading in result.stdout


def test_evaluate_bad_checkpoint_is_one_line(tmp_path: Path) -> None:
    """Garbage, and a whole module pickled by torch.save: one line each, and never torch's advice to load
    the file with weights_only=False (which would let it run code)."""
    garbage, module = tmp_path / "x.pt", tmp_path / "module.pt"
    garbage.write_bytes(b"garbage")
    torch.save(torch.nn.Linear(2, 2), module)
    for bad in (garbage, module):
        result = run_main("evaluate", "--checkpoint", str(bad))
        line = one_error_line(result.stderr)
        assert result.returncode == 1 and str(bad) in line and "weights_only" not in line, line


def test_predict_top5_for_images_of_any_size(run_dir: Path, tmp_path: Path) -> None:
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.jpg"
    Image.new("RGB", (100, 60), (200, 30, 30)).save(wide)
    Image.new("L", (20, 50), 128).save(tall)
    checkpoint = str(next((run_dir / "checkpoints").glob("best.pt")))
    result = run_main("predict", "--checkpoint", checkpoint, str(wide), str(tall), "--json")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert [p["image"] for p in predictions] == [str(wide), str(tall)]
    for p in predictions:
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["class"].startswith("class_") for t in p["top"])
    text = run_main("predict", "--checkpoint", checkpoint, str(wide))
    assert text.stdout.splitlines()[0] == str(wide) and text.stdout.splitlines()[1].strip().startswith("1. class_")


def test_predict_names_a_file_that_is_not_an_image(run_dir: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    checkpoint = str(run_dir / "checkpoints" / "training_checkpoint_10.pt")
    result = run_main("predict", "--checkpoint", checkpoint, str(notes))
    assert result.returncode == 1 and result.stdout == ""
    line = one_error_line(result.stderr)
    assert str(notes) in line and "not an image" in line


@pytest.mark.slow
def test_evaluate_into_a_closed_pipe_ends_quietly(run_dir: Path) -> None:
    checkpoint = str(run_dir / "checkpoints" / "training_checkpoint_10.pt")
    for buffered in (True, False):
        result = run_into_closed_pipe("evaluate", "--checkpoint", checkpoint, "--json", "--device", "cpu",
                                      buffered=buffered)
        assert result.returncode == 141 and result.stderr == "", result.stderr


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_black_png(path: Path, width: int, height: int, extra_chunk: bytes = b"") -> Path:
    """A valid 1-bit greyscale PNG, all black: under 50 kB even at 20000 x 20000."""
    pack = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte, then the row's bits
    pixels = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra_chunk + _chunk(b"IDAT", pixels)
                     + _chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("width,height,extra_chunk,words", [
    (20_000, 20_000, b"", "image too large to decode safely"),  # above twice PIL's limit: PIL raises
    (10_000, 10_000, b"", "image too large to decode safely"),  # between once and twice: PIL only warns
    (4, 4, _chunk(b"zTXt", b"note\x00\x00" + zlib.compress(b" " * (2 << 20))),  # text that unpacks to 2 MB
     "Decompressed data too large"),
], ids=["twice-the-limit", "over-the-limit", "text-chunk"])
def test_predict_refuses_images_too_large_to_decode_safely(tmp_path: Path, width, height, extra_chunk,
                                                           words) -> None:
    path = _write_black_png(tmp_path / "big.png", width, height, extra_chunk)
    assert path.stat().st_size < 100_000
    with pytest.raises(UserError) as e:
        load_image(path)
    assert str(e.value).startswith(f"{path}: ") and words in str(e.value)


def test_predict_names_an_image_too_large_in_one_line(run_dir: Path, tmp_path: Path) -> None:
    big = _write_black_png(tmp_path / "big.png", 20_000, 20_000)
    checkpoint = str(run_dir / "checkpoints" / "training_checkpoint_10.pt")
    result = run_main("predict", "--checkpoint", checkpoint, str(big))
    assert result.returncode == 1 and result.stdout == "" and one_error_line(result.stderr)
    assert str(big) in result.stderr and "too large to decode safely" in result.stderr

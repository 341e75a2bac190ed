"""The folder source end to end: layouts, labels by class name, clutter ignored, bad inputs
skipped and reported, errors."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from helpers.tiny import data_config as shared_data_config
from helpers.tiny import tiny_config
from PIL import Image

from dino_jax.data import pipeline
from dino_jax.data.decode import SkipLog, decode_image, reason_kind, to_canvas
from dino_jax.data.sources import DataError, check_eval_classes
from dino_jax.data.sources.folder import list_folder
from dino_jax.evaluate.during_training import TrainingEvaluator
from dino_jax.evaluate.knn_eval import knn_evaluation, knn_metrics
from dino_jax.trainer import train

CANVAS = 64
RNG = np.random.default_rng(0)


def data_config(data_dir, **overrides):
    folder = {"source": "folder", "data_dir": str(data_dir), "eval_test_split": "train"}
    return shared_data_config(**{**folder, "canvas_size": CANVAS, **overrides})


def save(path, image: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())


def rgb(height: int, width: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey16_png(height: int, width: int) -> bytes:
    rows = b"".join(b"\0" + (np.arange(width, dtype=">u2") * 4000).tobytes() for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def build_messy_folder(root) -> tuple[list, dict]:
    """Good images of every awkward kind among bad inputs. Returns (good paths, expected skips)."""
    good_dir, other_dir = root / "train" / "a_good", root / "train" / "b_more"
    save(good_dir / "rgb.png", rgb(20, 30), "PNG")
    save(good_dir / "grey.png", rgb(9, 11).convert("L"), "PNG")
    save(good_dir / "rgba.png", Image.fromarray(RNG.integers(0, 256, (8, 8, 4), np.uint8)), "PNG")
    save(good_dir / "palette.png", rgb(10, 10).convert("P"), "PNG", transparency=0)
    save(good_dir / "cmyk.jpg", Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG")
    (good_dir / "grey16.png").write_bytes(grey16_png(6, 7))
    save(good_dir / "tiny.png", rgb(3, 2), "PNG")  # smaller than any crop: kept
    save(good_dir / "large.jpeg", rgb(300, 200), "JPEG")  # downscaled to the canvas
    save(good_dir / "UPPER.JPG", rgb(12, 12), "JPEG")
    save(good_dir / "photo.webp", rgb(10, 14), "WEBP")
    save(good_dir / "photo.bmp", rgb(10, 14), "BMP")
    save(good_dir / "sub" / "nested.png", rgb(5, 5), "PNG")
    save(other_dir / "one.png", rgb(16, 16), "PNG")
    save(other_dir / "two.jpg", rgb(16, 16), "JPEG")
    good = sorted(p for p in root.rglob("*") if p.is_file())

    jpeg = io.BytesIO()
    rgb(64, 64).save(jpeg, "JPEG")
    (good_dir / "truncated.jpg").write_bytes(jpeg.getvalue()[:600])
    buf = io.BytesIO()
    rgb(64, 64).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[len(png) // 2 : len(png) // 2 + 64] = b"\xff" * 64
    (good_dir / "corrupt.png").write_bytes(bytes(png))
    (good_dir / "empty.png").write_bytes(b"")
    (good_dir / "text.jpg").write_text("not a picture\n")
    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    huge = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    )
    (good_dir / "huge.png").write_bytes(huge)
    os.symlink("loop_b.jpg", good_dir / "loop_a.jpg")
    os.symlink("loop_a.jpg", good_dir / "loop_b.jpg")
    os.symlink("missing.jpg", good_dir / "dangling.jpg")
    os.mkfifo(good_dir / "fifo.jpg")  # reading it would block forever
    os.symlink("..", good_dir / "sub" / "loop")
    (good_dir / "notes.txt").write_text("ignored: not an image extension")
    save(good_dir / ".hidden.png", rgb(4, 4), "PNG")  # hidden: ignored
    save(root / "train" / "loose.png", rgb(4, 4), "PNG")
    save(other_dir / "gone.png", rgb(4, 4), "PNG")  # deleted after listing by the tests
    skips = {
        good_dir / "truncated.jpg": "corrupt",
        good_dir / "corrupt.png": "corrupt",
        good_dir / "empty.png": "empty file",
        good_dir / "text.jpg": "not an image",
        good_dir / "huge.png": "too large",
        good_dir / "loop_a.jpg": "symlink loop",
        good_dir / "loop_b.jpg": "symlink loop",
        good_dir / "dangling.jpg": "broken symlink",
        good_dir / "fifo.jpg": "not a regular file",
        good_dir / "sub" / "loop": "symlink loop",
        root / "train" / "loose.png": "outside the class folders",
        other_dir / "gone.png": "unreadable",
    }
    if os.geteuid() != 0:  # root reads anything, so the permission case only exists for others
        save(other_dir / "locked.png", rgb(4, 4), "PNG")
        os.chmod(other_dir / "locked.png", 0)
        skips[other_dir / "locked.png"] = "unreadable"
    return good, {str(k): v for k, v in skips.items()}


def expected_example(path, root) -> tuple[bytes, tuple, int]:
    canvas, size = to_canvas(decode_image(path.read_bytes(), CANVAS), CANVAS)
    label = 0 if "a_good" in str(path) else 1
    return canvas.tobytes(), tuple(size.tolist()), label


def rows(batch, mask=None) -> list:
    keep = np.ones(len(batch["label"]), bool) if mask is None else mask
    return [
        (image.tobytes(), tuple(size.tolist()), int(label))
        for image, size, label, k in zip(
            batch["image"], batch["size"], batch["label"], keep, strict=True
        )
        if k
    ]


def test_eval_yields_exactly_the_good_images_and_reports_every_skip(tmp_path):
    good, skips = build_messy_folder(tmp_path)
    log = SkipLog(tmp_path / "skipped.tsv")
    data = pipeline.eval_data(data_config(tmp_path), "train", 8, skips=log)
    os.remove(tmp_path / "train" / "b_more" / "gone.png")
    batches = list(data)
    assert len(batches) == data.num_batches
    seen = [r for b in batches for r in rows(b, b["mask"])]
    assert sorted(seen) == sorted(expected_example(p, tmp_path) for p in good)
    assert {k: reason_kind(r) for k, r in log.entries()} == skips
    assert log.count == len(skips)
    assert len((tmp_path / "skipped.tsv").read_text().splitlines()) == 1 + len(skips)  # header


def test_training_epoch_yields_only_good_images(tmp_path):
    good, skips = build_messy_folder(tmp_path)
    # Files that pass the listing and fail only when read or decoded.
    decode_kinds = ("corrupt", "empty file", "not an image", "too large", "unreadable")
    listed = len(good) + sum(1 for kind in skips.values() if kind in decode_kinds)
    log = SkipLog()
    data = pipeline.train_data(data_config(tmp_path), listed, skips=log)
    os.remove(tmp_path / "train" / "b_more" / "gone.png")
    assert data.steps_per_epoch == 1  # one batch holds every listed file once
    batch = next(iter(data))
    assert set(batch) == {"image", "size", "label"}
    assert batch["image"].shape == (listed, CANVAS, CANVAS, 3)
    # Bad slots hold copies of good examples of the same batch: the set seen is the good set.
    assert set(rows(batch)) == {expected_example(p, tmp_path) for p in good}
    assert {k: reason_kind(r) for k, r in log.entries()} == skips


def test_class_layout_labels_are_sorted_folder_indices(tmp_path):
    for name in ["zebra", "ant", "moose"]:
        save(tmp_path / name / "x.png", rgb(4, 4), "PNG")
    listing = list_folder(str(tmp_path), SkipLog())
    assert listing.class_names == ("ant", "moose", "zebra")
    pairs = zip(listing.paths, listing.labels, strict=True)
    labels = {os.path.basename(os.path.dirname(path)): int(label) for path, label in pairs}
    assert labels == {"ant": 0, "moose": 1, "zebra": 2}


def test_flat_folder_has_no_labels_and_split_empty_reads_data_dir(tmp_path):
    for i in range(6):
        save(tmp_path / f"{i}.png", rgb(4 + i, 4), "PNG")
    data = pipeline.eval_data(data_config(tmp_path, split=""), "", 6)
    (batch,) = list(data)
    assert batch["label"].tolist() == [-1] * 6 and batch["mask"].all()
    assert sorted(batch["size"][:, 0].tolist()) == [4, 5, 6, 7, 8, 9]


def test_processes_read_disjoint_strides_that_cover_the_folder(tmp_path):
    for i in range(11):
        save(tmp_path / "train" / f"c{i % 3}" / f"{i}.png", rgb(4, 4 + i), "PNG")
    widths = []
    for process in range(2):
        data = pipeline.eval_data(
            data_config(tmp_path), "train", 4, process_index=process, process_count=2
        )
        batches = list(data)
        assert len(batches) == data.num_batches == 3  # ceil(ceil(11 / 2) / 2)
        widths.append(
            [int(w) for b in batches for w, m in zip(b["size"][:, 1], b["mask"], strict=True) if m]
        )
    assert len(widths[0]) == 6 and len(widths[1]) == 5
    assert sorted(widths[0] + widths[1]) == list(range(4, 15))


def test_missing_and_empty_directories_fail_at_start_with_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{missing}.*does not exist"):
        pipeline.train_data(data_config(missing), 2)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images .* under .*empty/train"):
        pipeline.train_data(data_config(tmp_path / "empty"), 2)
    (tmp_path / "texts" / "train" / "cls").mkdir(parents=True)
    (tmp_path / "texts" / "train" / "cls" / "a.tif").write_bytes(b"II*\0")
    with pytest.raises(DataError, match="1 other files"):
        pipeline.train_data(data_config(tmp_path / "texts"), 2)
    with pytest.raises(DataError, match=r"split 'val' expects the folder .*/texts/val"):
        pipeline.eval_data(data_config(tmp_path / "texts"), "val", 2)
    with pytest.raises(DataError, match=r"needs config\.data\.data_dir"):
        pipeline.train_data(data_config(""), 2)


def test_unknown_source_and_too_small_dataset(tmp_path):
    with pytest.raises(DataError, match="'csv' is not one of"):
        pipeline.train_data(data_config(tmp_path, source="csv"), 2)
    save(tmp_path / "train" / "c" / "a.png", rgb(4, 4), "PNG")
    with pytest.raises(DataError, match="fewer than one global batch"):
        pipeline.train_data(data_config(tmp_path), 4)


# ----------------------------------------------------------------------------- clutter and labels

JUNK = [
    "__MACOSX",
    "__macosx",
    "@eaDir",
    ".ipynb_checkpoints",
    ".Trashes",
    "$RECYCLE.BIN",
    "System Volume Information",
    "lost+found",
    "#recycle",
    "@Recycle",
]
JUNK_FILES = ["._cat0.png", ".DS_Store", "Thumbs.db", "desktop.ini", "Icon\r"]


def make_classes(root, names, per_class: int = 2) -> None:
    for name in names:
        for i in range(per_class):
            save(root / name / f"{name}{i}.png", rgb(4, 4 + i), "PNG")


@pytest.mark.parametrize("junk", JUNK)
def test_clutter_folders_are_neither_classes_nor_images(tmp_path, tally, junk):
    make_classes(tmp_path, ["ant", "bee"])
    # as left by an archiver or a NAS: image files inside, at the top and in a class folder
    save(tmp_path / junk / "ant" / "ant0.png", rgb(4, 4), "PNG")
    save(tmp_path / "ant" / junk / "SYNOPHOTO_THUMB_S.jpg", rgb(4, 4), "JPEG")
    for name in JUNK_FILES:
        (tmp_path / "ant" / name).write_bytes(b"\0\5\26\7 resource fork")
        (tmp_path / name).write_bytes(b"\0\5\26\7 resource fork")
    skips = SkipLog()
    listing = list_folder(str(tmp_path), skips)
    with tally.bad_input():
        assert listing.class_names == ("ant", "bee")
        assert sorted(os.path.basename(p) for p in listing.paths) == [
            "ant0.png",
            "ant1.png",
            "bee0.png",
            "bee1.png",
        ]
        assert listing.other_files == 0 and skips.count == 0
        assert len(listing.junk) == 2 + 2 * len(JUNK_FILES)


def test_the_test_split_takes_the_bank_labels_by_class_name(tmp_path, tally):
    make_classes(tmp_path / "train", ["ant", "bee", "cat"])
    make_classes(tmp_path / "val", ["bee", "cat"])  # no "ant": sorted on its own, bee would be 0
    (tmp_path / "train" / "__MACOSX" / "ant").mkdir(parents=True)  # junk: must not shift labels
    config = data_config(tmp_path, eval_train_split="train", eval_test_split="val")
    with tally.bad_input():
        (val,) = list(pipeline.eval_data(config, "val", 4))
        assert sorted(val["label"][val["mask"]].tolist()) == [1, 1, 2, 2]
        (bank,) = list(pipeline.eval_data(config, "train", 6))
        assert sorted(bank["label"][bank["mask"]].tolist()) == [0, 0, 1, 1, 2, 2]


def test_evaluations_whose_splits_disagree_on_class_names_are_refused(tmp_path, tally):
    make_classes(tmp_path / "train", ["ant", "bee", "cat"])
    make_classes(tmp_path / "val", ["Bee", "cat", "dog"])
    make_classes(tmp_path / "bees", ["bee"])
    for i in range(2):
        save(tmp_path / "flat" / f"{i}.png", rgb(4, 4), "PNG")
    config = data_config(tmp_path, eval_train_split="train", eval_test_split="val")
    message = (
        r"the split 'val' .* has class folders that the split 'train' .* lacks: \['Bee', 'dog'\]"
    )
    for check in (
        lambda: pipeline.eval_data(config, "val", 4),
        lambda: check_eval_classes(config),
    ):
        with tally.bad_input(), pytest.raises(DataError, match=message) as refused:
            check()
        assert "'Bee' ~ 'bee'" in str(refused.value)
    # a bank class that the test split lacks is fine; a test split without classes is not
    check_eval_classes(data_config(tmp_path, eval_train_split="train", eval_test_split="bees"))
    for bank, test in (("train", "flat"), ("flat", "bees")):
        flat = data_config(tmp_path, eval_train_split=bank, eval_test_split=test)
        with tally.bad_input(), pytest.raises(DataError, match=r"split 'flat' .* no class sub-f"):
            check_eval_classes(flat)


def test_runs_and_evaluations_refuse_disagreeing_splits_before_any_work(tmp_path, tally):
    make_classes(tmp_path / "train", ["ant", "bee"], per_class=8)
    make_classes(tmp_path / "val", ["ant", "dog"])
    config = tiny_config(
        **{
            "data.source": "folder",
            "data.data_dir": str(tmp_path),
            "data.split": "train",
            "data.eval_train_split": "train",
            "data.eval_test_split": "val",
        }
    )
    asked = []
    attempts = {
        "training": lambda: train(config, str(tmp_path / "run")),
        "the evaluator": lambda: TrainingEvaluator(config, None, None, str(tmp_path / "run")),
        "k-NN": lambda: knn_evaluation(config, None, None, None, features=asked.append),
    }
    for what, attempt in attempts.items():
        with tally.bad_input(), pytest.raises(DataError, match=r"lacks: \['dog'\]"):
            attempt()
        assert not asked and not (tmp_path / "run").exists(), what


def test_knn_refuses_a_split_with_no_readable_or_labelled_image(tmp_path):
    config = tiny_config(**{"data.eval_train_split": "train", "data.eval_test_split": "test"})
    feats, labels = np.ones((4, 8), np.float32), np.arange(4) % 2
    empty = (np.zeros((0, 8), np.float32), np.zeros(0, np.int64))
    with pytest.raises(DataError, match=r"no image of the k-NN bank split 'train' could be read"):
        knn_metrics(config, empty, (feats, labels), None)
    with pytest.raises(DataError, match=r"the k-NN test split 'test' has no labels"):
        knn_metrics(config, (feats, labels), (feats, -np.ones(4, np.int64)), None)

"""Every way out of a process with a live input pipeline ends it at once, background work
included: a data error at the first batch, an error or Ctrl-C later, a normal end.

A tf.data iterator still decoding (Python, under the GIL) when Python finalizes never finishes:
its threads can no longer take the GIL and the process hangs at exit. The scripts below run
the folder pipeline with a decoder slowed down so that it is always busy when they exit.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers.fault_config import train_py
from helpers.tiny import data_config
from PIL import Image

from dino_jax.data import decode, pipeline
from dino_jax.data.sources import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_BOUND = 60  # seconds: a hang is a run still alive then; a normal exit takes a few

SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from helpers.tiny import data_config
    from dino_jax.data import decode, pipeline
    from dino_jax.data.sources import DataError

    mode, folder = sys.argv[1:]
    original, calls = decode.decode_image, []

    def busy_decode(data, canvas_size):
        calls.append(1)
        if mode == "decoder-bug" and len(calls) == 40:
            raise RuntimeError("a bug in the decoder")  # not a BadImage: the stream fails
        # Decodes after the batch that ends the script are slow: still running at its exit.
        slow = len(calls) > (40 if mode == "decoder-bug" else 8)
        end = time.perf_counter() + (0.5 if slow else 0.02)
        while time.perf_counter() < end:  # Python work holding the GIL, as PIL's wrappers do
            pass
        return original(data, canvas_size)

    decode.decode_image = busy_decode
    stream = iter(pipeline.train_data(data_config(source="folder", data_dir=folder, split=""), 8))
    if mode == "first":
        try:
            next(stream)
        except DataError as err:
            KEPT = err  # a traceback kept alive (as by a reference cycle) until Python finalizes
            print("refused:", err, flush=True)
            sys.exit(2)
    for _ in range(100):  # an uncaught error's traceback is kept (sys.last_traceback)
        next(stream)
        if mode == "interrupt":
            raise KeyboardInterrupt
        if mode == "error":
            raise RuntimeError("a bug after the first batch")
    """
)


def write_images(folder, n: int, readable: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        if readable:
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8)).save(folder / f"{i}.png")
        else:
            (folder / f"{i}.jpg").write_text(f"not an image {i}\n")


def run_script(mode: str, folder) -> subprocess.CompletedProcess:
    code = SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    cmd = [sys.executable, "-c", code, mode, str(folder)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=EXIT_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{mode}: the process was still alive after {EXIT_BOUND} s (hung at exit)")


@pytest.mark.parametrize(
    ("mode", "readable", "status"),
    [
        ("first", False, 2),  # DataError at the first batch, its traceback kept
        ("interrupt", True, -signal.SIGINT),  # Ctrl-C while the stream is open
        ("error", True, 1),  # an unexpected error while the stream is open
        ("decoder-bug", True, 1),  # an unexpected error inside the stream (TensorFlow's frames)
    ],
)
def test_a_process_with_a_busy_pipeline_exits_at_once(tmp_path, tally, mode, readable, status):
    write_images(tmp_path / "images", 64, readable)
    with tally.fault():
        done = run_script(mode, tmp_path / "images")
        assert done.returncode == status, (done.returncode, done.stderr[-3000:])
    if mode == "first":
        assert "no image of the first batch (8 inputs) could be read" in done.stdout


def test_the_first_batch_refusal_stops_the_decoding(tmp_path, monkeypatch, tally):
    write_images(tmp_path / "images", 64, readable=False)
    calls = []
    original = decode.decode_image

    def counted(data, canvas_size):
        calls.append(1)
        time.sleep(0.1)  # the next batch is still being decoded when the first is refused
        return original(data, canvas_size)

    monkeypatch.setattr(decode, "decode_image", counted)
    config = data_config(source="folder", data_dir=str(tmp_path / "images"), split="")
    stream = iter(pipeline.train_data(config, 8))
    with tally.bad_input(), pytest.raises(DataError, match="no image of the first batch") as err:
        next(stream)
    seen = len(calls)
    time.sleep(1.0)  # an open endless stream would go on decoding ahead all this time
    # (the error's traceback, kept here as a caller may keep it, refers to the stream)
    assert err.traceback and len(calls) == seen, "the pipeline went on decoding after the error"


def test_a_mostly_unreadable_folder_warns_and_fills_slots(tmp_path, caplog):
    write_images(tmp_path / "images", 12, readable=False)
    Image.new("RGB", (9, 7), (200, 10, 10)).save(tmp_path / "images" / "good.png")
    config = data_config(source="folder", data_dir=str(tmp_path / "images"), split="")
    stream = iter(pipeline.train_data(config, 13))  # one batch: 12 unreadable, 1 readable
    with caplog.at_level("WARNING"):
        batch = next(stream)
    stream.close()
    assert (batch["size"] == [7, 9]).all()  # every slot holds the one readable image
    assert "12 of the first 13 inputs could not be read" in caplog.text


def test_train_py_refuses_an_unreadable_first_batch_and_exits(tmp_path, tally):
    """The command itself, on a folder of 31 unreadable files and one image (in the second
    batch of the seeded order): status 2 and the message, within the bound."""
    images = tmp_path / "images"
    write_images(images, 31, readable=False)
    Image.new("RGB", (9, 7), (200, 10, 10)).save(images / "z_good.png")
    with tally.bad_input():
        done = train_py(
            tmp_path / "run",
            "--config.data.source=folder",
            f"--config.data.data_dir={images}",
            "--config.data.split=",
            timeout=EXIT_BOUND + 60,  # start-up and the step's compilation come first
        )
        assert done.returncode == 2, done.stderr[-3000:]
        assert "no image of the first batch (16 inputs) could be read" in done.stderr
        assert "Traceback" not in done.stderr

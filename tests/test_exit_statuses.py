"""Every command keeps to one table of exit statuses (dino_jax/cli.py): a user error is exit 2
with a message, never a traceback, found before the work directory (or an output folder) is
touched and before anything is compiled."""

import logging
import os
import shutil
import subprocess
import sys

import jax
import pytest
from helpers.fault_helpers import HELPERS, ROOT
from helpers.tiny import SMALL_EVAL_DATA
from helpers.xla import xla_flags

from dino_jax import cli
from dino_jax.bench import step as bench_step
from dino_jax.checkpoint_resume import CheckpointError
from dino_jax.checkpoint_storage import CheckpointSaveError
from dino_jax.config import ConfigError
from dino_jax.data.sources import DataError
from dino_jax.evaluate import cli as evaluate_cli
from dino_jax.train import exit_status
from dino_jax.train import main as train_main
from dino_jax.trainer import NonFiniteLossError
from dino_jax.workdir import WorkdirLock, WorkdirLockedError

RECIPE = str(HELPERS / "fault_config.py")  # the tiny config as a recipe file
BACKBONE = str(ROOT / "tests" / "fixtures" / "backbone.pth")
IMAGE = str(ROOT / "docs" / "demo_attention.png")
KNN = ["knn", "--weights", BACKBONE, "--num_heads", "2", *SMALL_EVAL_DATA]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write: permission bits, or (as root, who ignores them)
    the immutable attribute."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    if os.access(path, os.W_OK):
        pytest.skip("no read-only directory can be made here (root without chattr +i)")
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


@pytest.fixture
def files(tmp_path):
    """Hostile files: a plain file, a file posing as a checkpoint, a recipe that does not
    parse."""
    (tmp_path / "notes.txt").write_text("not a directory")
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02cos\nsystem\nq\x00.")
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoints").write_text("")
    return tmp_path


def refused(main, argv, capsys, caplog, message):
    """`main(argv)` exits 2 with `message` on stderr or in the log, and no traceback."""
    caplog.set_level(logging.INFO)
    with jax.log_compiles(), pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr().err + caplog.text
    assert exit_info.value.code == cli.USER_ERROR, out[-3000:]
    assert message in out, out[-3000:]
    assert "Traceback" not in out
    assert "Compiling" not in out  # nothing was compiled (JAX logs every compilation)


def train_cases(t, read_only):
    w = f"--workdir={t / 'run'}"
    return {
        "work directory is a file": ([f"--workdir={t / 'notes.txt'}"], "is not a directory"),
        "work directory under a file": (
            [f"--workdir={t / 'notes.txt' / 'run'}"],
            f"cannot be created: {t / 'notes.txt'} is not a directory",
        ),
        "read-only work directory": ([f"--workdir={read_only}"], "is not writable"),
        "work directory under a read-only one": (
            [f"--workdir={read_only / 'run'}"],
            f"cannot be created: {read_only} is not writable",
        ),
        "checkpoints/ is a file": ([f"--workdir={t / 'old'}"], "which is not a directory"),
        "empty --workdir": (["--workdir="], "--workdir is empty"),
        "missing recipe file": (
            [w, f"--config={t / 'nothing.py'}"],
            "no such file and no recipe of that name",
        ),
        "recipe with a syntax error": ([w, f"--config={t / 'broken.py'}"], "SyntaxError"),
        "init_from that is not a checkpoint": (
            [w, f"--config.init_from={t / 'junk.pth'}"],
            f"init_from: {t / 'junk.pth'}",
        ),
        "init_from of another model": (
            [w, f"--config.init_from={BACKBONE}"],
            "does not fit the configured model",
        ),
        "init_from a directory": ([w, f"--config.init_from={t}"], "is not a file"),
        "--num_processes without a coordinator": (
            [w, "--num_processes=2"],
            "--num_processes is only read with --coordinator_address",
        ),
        "heartbeat of 0 s": ([w, "--heartbeat_timeout_seconds=0"], "a positive number"),
        "seed 2**64": ([w, "--config.seed=18446744073709551616"], "a seed is an int in"),
        "k above the bank": (
            [
                w,
                "--config.data.eval_train_split=test",
                "--config.data.eval_test_split=test",
                "--config.eval.knn_max_train=100",
            ],
            "k = 200 exceeds the k-NN bank of 100 images",
        ),
        "a dataset smaller than one batch": (
            [w, "--config.data.source=synthetic", "--config.data.synthetic_examples=8"],
            "fewer than one global batch",
        ),
    }


TRAIN_CASES = list(train_cases(ROOT, ROOT / "read-only"))


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_train_refuses_with_a_message_before_touching_the_work_directory(
    name, files, capsys, caplog, tally, request
):
    # made only where needed: it can be impossible (root without chattr) and skips the test
    read_only = request.getfixturevalue("read_only_dir") if "read-only" in name else files
    argv, message = train_cases(files, read_only)[name]
    before = sorted(p.name for p in files.rglob("*"))
    with tally.bad_input():
        refused(train_main, [f"--config={RECIPE}", *argv], capsys, caplog, message)
        assert sorted(p.name for p in files.rglob("*")) == before  # nothing made, not even run/


def test_train_refuses_a_work_directory_another_trainer_holds(tmp_path, capsys, caplog, tally):
    run = tmp_path / "run"
    with tally.bad_input(), WorkdirLock(str(run)):
        before = sorted(run.iterdir())
        argv = [f"--config={RECIPE}", f"--workdir={run}"]
        refused(train_main, argv, capsys, caplog, f"pid {os.getpid()} on host")
        assert sorted(run.iterdir()) == before


def evaluate_cases(t):
    out = ["--out", str(t / "out")]
    return {
        "weights that do not exist": (["knn", "--weights", str(t / "none")], "does not exist"),
        "weights that are not a checkpoint": (
            ["knn", "--weights", str(t / "junk.pth")],
            "refused global os.system (nothing was run)",
        ),
        "--out is a file": ([*KNN, "--out", str(t / "notes.txt")], "is not a directory"),
        "--features_dir under a file": (
            [*KNN, "--features_dir", str(t / "notes.txt" / "f")],
            "cannot be created",
        ),
        "k above the bank": ([*KNN, *out], "k = 100, 200 exceed the k-NN bank of 64 images"),
        "empty k-NN ks": ([*KNN, *out, "--config.eval.knn_ks=()"], "eval.knn_ks=(): one or more"),
        "a folder without the split": (
            [*KNN, *out, "--config.data.source=folder", f"--config.data.data_dir={t / 'old'}"],
            "split 'train' expects the folder",
        ),
        "linear batch above the data": (
            [
                "linear",
                *KNN[1:],
                *out,
                "--config.linear.n_last_blocks=1",
                "--config.linear.batch_size=128",
            ],
            "linear.batch_size=128 is more than the 64 images",
        ),
        "attention on a file that is not an image": (
            ["attention", *KNN[1:5], "--image", str(t / "notes.txt"), *out],
            "is not a readable image",
        ),
        "attention image size 0": (
            ["attention", *KNN[1:5], "--image", IMAGE, *out, "--image_size", "0"],
            "--image_size 0: one positive int",
        ),
    }


@pytest.mark.parametrize("name", list(evaluate_cases(ROOT)))
def test_evaluate_refuses_with_a_message_before_computing(name, files, capsys, caplog, tally):
    argv, message = evaluate_cases(files)[name]
    with tally.bad_input():
        refused(evaluate_cli.evaluate, argv, capsys, caplog, message)
        assert not (files / "out").exists()


def bench_cases(t):
    return {
        "no timed step": (["--steps", "0"], "--steps 0: at least 1"),
        "negative warm-up": (["--warmup", "-1"], "--warmup -1"),
        "batch of 0": (["--batch", "0"], "--batch 0: at least 1"),
        "batch not divisible by the devices": (["--batch", "12"], "not divisible by the 8"),
        "missing recipe file": ([f"--config={t / 'nothing.py'}"], "no such file"),
        "init_from that is not a checkpoint": (
            [f"--config.init_from={t / 'junk.pth'}"],
            f"init_from: {t / 'junk.pth'}",
        ),
    }


@pytest.mark.parametrize("name", list(bench_cases(ROOT)))
def test_bench_step_refuses_with_a_message_before_compiling(name, files, capsys, caplog, tally):
    argv, message = bench_cases(files)[name]
    with tally.bad_input():
        refused(bench_step.main, [f"--config={RECIPE}", *argv], capsys, caplog, message)


def run_command(*args, timeout=120):
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_processes_exit_2_with_one_message_and_no_traceback(files, tally):
    commands = {
        "train": (
            [
                "train.py",
                f"--config={RECIPE}",
                f"--workdir={files / 'run'}",
                f"--config.init_from={files / 'junk.pth'}",
            ],
            "init_from: ",
        ),
        "evaluate": (["-m", "dino_jax.evaluate", *KNN], "exceed the k-NN bank of 64 images"),
        "bench step": (["-m", "dino_jax.bench", "step", f"--config={RECIPE}", "--steps", "0"], "0"),
    }
    for name, (args, message) in commands.items():
        with tally.bad_input():
            result = run_command(*args)
            assert result.returncode == 2, (name, result.stderr[-3000:])
            assert message in result.stderr and "Traceback" not in result.stderr, name
    assert not (files / "run").exists()


def test_each_training_error_has_its_documented_status():
    assert exit_status(CheckpointSaveError("disk full")) == cli.STORAGE_FAILED == 4
    assert exit_status(NonFiniteLossError("nan")) == cli.NON_FINITE == 3
    for user_error in (
        ConfigError("x"),
        DataError("x"),
        CheckpointError("x"),
        WorkdirLockedError("x"),
    ):
        assert exit_status(user_error) == cli.USER_ERROR == 2
    assert exit_status(RuntimeError("a bug")) is None  # keeps its traceback: exit 1


def test_a_full_disk_met_outside_a_save_exits_4_with_one_message(
    tmp_path, monkeypatch, capsys, caplog, tally
):
    # e.g. train.jsonl or skipped_files.tsv written when the disk is full
    import errno

    import dino_jax.trainer

    log = str(tmp_path / "w" / "train.jsonl")

    def full_disk(config, workdir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), log)

    monkeypatch.setattr(dino_jax.trainer, "train", full_disk)
    with tally.fault():
        with pytest.raises(SystemExit) as stop:
            train_main([f"--config={RECIPE}", f"--workdir={tmp_path / 'w'}"])
        assert stop.value.code == cli.STORAGE_FAILED
        text = caplog.text + capsys.readouterr().err
        assert f"could not write {log}" in text and "Traceback" not in text

"""The storage failing while the run saves its work (disk full, a refused write): one message,
at the save that failed, naming it and the last complete checkpoint, which stays intact;
nothing partial is left; `train.py` exits with status 4; the next start resumes.

The storage is failed four ways: an error raised inside Orbax's asynchronous commit (any
machine, in-process); a per-process file-size limit (RLIMIT_FSIZE), with which the kernel
refuses writes with EFBIG (any machine, no privileges); a small tmpfs filled up (real ENOSPC;
needs root, skipped otherwise); /dev/full, which fails every write with ENOSPC."""

import errno
import os
import pathlib
import subprocess
import sys
import threading

import pytest
from helpers.fault_helpers import finalised_steps, history, temporary_checkpoints
from helpers.tiny import tiny_config
from helpers.xla import xla_flags
from orbax.checkpoint._src.futures import future as orbax_future
from orbax.checkpoint._src.path import atomicity

from dino_jax.checkpoint import HISTORY, Checkpointer
from dino_jax.checkpoint_storage import CheckpointSaveError
from dino_jax.trainer import FINAL, train, write_final

ENOSPC = "No space left on device [ENOSPC]"
ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPE = ROOT / "tests" / "helpers" / "fault_config.py"

# The writes a failed save abandons are reported by asyncio and Orbax when collected; the
# checkpoint module quiets them, and pytest must not turn the rest into warnings here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def fail_commit(monkeypatch, step: int, stage: str = "finalize") -> None:
    """Orbax's creation ("create") or commit ("finalize", in the background) of the directory
    of checkpoint `step` fails as a full disk makes it fail."""
    original = getattr(atomicity.AtomicRenameTemporaryPath, stage)

    async def failing(self, *args, **kwargs):
        if self.get_final().name == str(step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, stage, failing)


def orbax_threads() -> list[threading.Thread]:
    """Orbax's threads still alive (a waiting one keeps the process from exiting)."""
    return [
        t
        for t in threading.enumerate()
        if t.is_alive()
        and any(
            m.startswith("orbax")
            for m in (type(t).__module__, getattr(getattr(t, "_target", None), "__module__", ""))
        )
    ]


@pytest.fixture(autouse=True)
def _release_stuck_orbax_threads():
    """Should a test fail with Orbax's threads still waiting, they would hold the test process
    at exit for Orbax's time-out: release them (as the checkpoint module does)."""
    yield
    for thread in orbax_threads():
        if hasattr(thread, "cancel") and hasattr(thread, "_receive_signals"):
            thread.cancel()
            orbax_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)


def saving_fails(workdir, **overrides) -> str:
    """Train `workdir` until a save fails; the message of the CheckpointSaveError, once
    checked that the failed save left nothing behind: no files, no threads."""
    with pytest.raises(CheckpointSaveError) as err:
        train(tiny_config(**overrides), str(workdir))
    assert temporary_checkpoints(workdir) == []
    assert orbax_threads() == []
    return str(err.value)


def test_a_failed_background_save_is_reported_as_that_save(tmp_path, monkeypatch, tally):
    with tally.fault():
        fail_commit(monkeypatch, 3)  # noticed when the save of 6 waits for it
        message = saving_fails(tmp_path, **{"train.max_steps": 9})
        assert message.startswith(
            f"could not save checkpoint 3 to {tmp_path / 'checkpoints' / '3'}: {ENOSPC}."
        )
        assert "No checkpoint is complete yet" in message
        assert finalised_steps(tmp_path) == [] and history(tmp_path) == []


def test_a_failed_last_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, tally):
    with tally.fault():
        # Creating its directory fails: Orbax's writers of checkpoint 6, waiting for it, would
        # hold the process 20 minutes (Orbax's time-out) if they were not released.
        fail_commit(monkeypatch, 6, "create")
        # keep_checkpoints=1: checkpoint 3 would be deleted if 6 were taken as saved
        message = saving_fails(tmp_path, **{"train.max_steps": 6, "train.keep_checkpoints": 1})
        last = tmp_path / "checkpoints" / "3"
        assert f"could not save checkpoint 6 to {tmp_path / 'checkpoints' / '6'}: {ENOSPC}" in (
            message
        )
        assert f"The last complete checkpoint is step 3 at {last} (intact)" in message
        assert finalised_steps(tmp_path) == [3]
        monkeypatch.undo()
        result = train(tiny_config(**{"train.max_steps": 6}), str(tmp_path))
        assert int(result.state.step) == 6
        assert history(tmp_path) == [("saved", 3), ("restored", 3), ("saved", 6)]


# Runs train.py with a file-size limit set in its own process (a preexec_fn would fork the
# multi-threaded test process).
LIMITED = (
    "import resource, runpy, sys; limit = int(sys.argv.pop(1));"
    " resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); sys.argv.pop(0);"
    " runpy.run_path(sys.argv[0], run_name='__main__')"
)


def train_py(workdir, *args, file_size_limit: int) -> subprocess.CompletedProcess:
    """`python train.py` (the tiny recipe) whose process may write no file beyond
    `file_size_limit` bytes: the kernel refuses such writes with EFBIG (Python ignores the
    SIGXFSZ that comes with them)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(8)}
    cmd = [sys.executable, "-c", LIMITED, str(file_size_limit), str(ROOT / "train.py")]
    cmd += [f"--config={RECIPE}", f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def one_message(proc: subprocess.CompletedProcess) -> str:
    """The error a storage failure ended `train.py` with: status 4, one message, no trace."""
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "could not" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_train_py_exits_4_when_the_kernel_refuses_a_checkpoint_write(tmp_path, tally):
    with tally.fault():
        # 40 kB: less than some array and tree files of every checkpoint of the tiny model
        proc = train_py(tmp_path, "--config.train.max_steps=6", file_size_limit=40_000)
        message = one_message(proc)
        assert f"could not save checkpoint 3 to {tmp_path / 'checkpoints' / '3'}" in message
        assert "File too large [EFBIG]" in message
        assert "No checkpoint is complete yet" in message
        assert finalised_steps(tmp_path) == [] and temporary_checkpoints(tmp_path) == []


NO_DEV_FULL = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")


@NO_DEV_FULL
def test_a_full_disk_at_the_history_append_is_one_message(tmp_path, tally):
    with tally.fault():
        (tmp_path / HISTORY).symlink_to("/dev/full")  # every write fails with ENOSPC
        ckpt = Checkpointer(str(tmp_path), keep=3)
        try:
            with pytest.raises(CheckpointSaveError) as err:
                ckpt.record(3, "saved")
        finally:
            ckpt.close()
        assert str(err.value).startswith(
            f"could not record checkpoint 3 (saved) in {tmp_path / HISTORY}: {ENOSPC}."
        )
        assert f"Checkpoint 3 itself is complete at {tmp_path / 'checkpoints' / '3'}" in (
            str(err.value)
        )


@NO_DEV_FULL
def test_a_full_disk_at_the_final_evaluation_is_one_message(tmp_path, tally):
    with tally.fault():
        (tmp_path / f"{FINAL}.tmp").symlink_to("/dev/full")
        with pytest.raises(CheckpointSaveError) as err:
            write_final(str(tmp_path), 250, {"knn/top1": 50.0})
        assert str(err.value).startswith(f"could not write {tmp_path / FINAL}: {ENOSPC}")
        assert "training finished and checkpoint 250 is complete" in str(err.value)
        assert not (tmp_path / FINAL).exists() and not (tmp_path / f"{FINAL}.tmp").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A mounted 8 MiB tmpfs (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            "cannot mount a tmpfs here (needs root): "
            + (mounted.stderr.strip() or f"status {mounted.returncode}")
            + "; the other tests of this file fail the storage without mounting"
        )
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(path: pathlib.Path) -> None:
    """Write `path` until its file system is full."""
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as err:
                assert err.errno == errno.ENOSPC


def test_a_disk_that_fills_up_keeps_the_last_checkpoint_and_resumes(small_disk, monkeypatch, tally):
    with tally.fault():
        workdir = small_disk / "run"
        save = Checkpointer.save

        def filling(self, state, meta, **kwargs):
            if int(state.step) == 6:
                self.wait()  # checkpoint 3 is complete
                fill(small_disk / "filler")
            return save(self, state, meta, **kwargs)

        monkeypatch.setattr(Checkpointer, "save", filling)
        # the last save: nothing else writes before it is waited for (train.jsonl would)
        message = saving_fails(workdir, **{"train.max_steps": 6})
        assert message.startswith(f"could not save checkpoint 6 to {workdir / 'checkpoints' / '6'}")
        assert ENOSPC in message
        assert f"The last complete checkpoint is step 3 at {workdir / 'checkpoints' / '3'}" in (
            message
        )
        assert finalised_steps(workdir) == [3]
        monkeypatch.undo()
        os.remove(small_disk / "filler")  # space freed: the same command resumes
        result = train(tiny_config(**{"train.max_steps": 6}), str(workdir))
        assert int(result.state.step) == 6 and ("restored", 3) in history(workdir)

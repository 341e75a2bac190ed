"""One work directory, one trainer: a second trainer is refused at once with a message naming
the holder, a lock left by a killed trainer never blocks the next start, and reading a work
directory (evaluation) takes no lock."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers.fault_config import train_py
from helpers.fault_helpers import ROOT, Worker

from dino_jax import workdir as wd
from dino_jax.workdir import WorkdirError, WorkdirLock, WorkdirLockedError


def holder_record(workdir, name="train.lock") -> dict:
    return json.loads((workdir / name).read_text())


def test_a_second_trainer_is_refused_at_once_and_the_first_goes_on(tmp_path, tally):
    workdir = tmp_path / "run"
    first = Worker(workdir, {"train.max_steps": 100_000})
    try:
        first.wait_for("START")  # restored: the lock is held from before this point
        with tally.fault():
            # The same command on the same directory; without the lock it would train a step.
            start = time.monotonic()
            second = train_py(workdir, "--config.train.max_steps=1")
            elapsed = time.monotonic() - start
            err = second.stderr
            assert second.returncode == 2, err[-3000:]
            assert "Traceback" not in err
            assert f"--workdir={workdir} is in use by another trainer: pid {first.proc.pid}" in err
            assert f"on host {socket.gethostname()}, started 20" in err
            assert "fault_worker.py" in err  # the holder's command line
            # refused before the data is listed (a large folder takes minutes to list)
            assert "train data" not in err
            assert elapsed < 60, elapsed
            tally.figure("second trainer on one work directory: refused, exit 2 (s)", elapsed)
            assert first.running()
        with tally.fault():
            # kill -9 leaves the lock file and its record, but not the lock
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(30)
            assert holder_record(workdir)["pid"] == first.proc.pid
            with WorkdirLock(str(workdir)):
                assert holder_record(workdir)["pid"] == os.getpid()
    finally:
        if first.running():
            first.proc.kill()
            first.proc.wait(30)


HOLD = """
import sys, time
from dino_jax.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1])
lock.acquire()
print("HELD", flush=True)
time.sleep(600)
"""


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, tally):
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid} on host"):
            WorkdirLock(str(workdir)).acquire()
        with tally.fault():
            holder.send_signal(signal.SIGKILL)
            holder.wait(30)
            assert holder_record(workdir)["pid"] == holder.pid  # a pid file alone would block
            wd.check_not_held(str(workdir))
            with WorkdirLock(str(workdir)):
                assert holder_record(workdir)["pid"] == os.getpid()
            assert (workdir / "train.lock").read_text() == ""  # released: no holder named
    finally:
        holder.kill()
        holder.wait(30)


def test_one_lock_per_process_index_and_per_start(tmp_path):
    path = str(tmp_path / "run")
    with WorkdirLock(path, 0), WorkdirLock(path, 1):  # the processes of one run
        # a second start in the same Python process is refused as well (flock is per open file)
        with pytest.raises(WorkdirLockedError, match="in use by another trainer"):
            WorkdirLock(path, 0).acquire()
        with pytest.raises(WorkdirLockedError, match=r"train\.process1\.lock"):
            wd.check_not_held(path, 1)
        assert holder_record(tmp_path / "run", "train.process1.lock")["process_index"] == 1
    wd.check_not_held(path, 0)
    with WorkdirLock(path, 0):  # released at the end of the run: the next start takes it
        pass


def test_a_file_system_without_locks_is_warned_about_and_trains(tmp_path, monkeypatch, caplog):
    def no_locks(f, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with WorkdirLock(str(tmp_path / "run")):
        assert holder_record(tmp_path / "run")["pid"] == os.getpid()
    assert "keeps no file locks (No locks available)" in caplog.text


@pytest.mark.parametrize("kind", ["a file", "under a file", "checkpoints is a file"])
def test_a_work_directory_that_cannot_be_one_is_named(tmp_path, kind, tally):
    (tmp_path / "notes").write_text("")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoints").write_text("")
    path = {
        "a file": tmp_path / "notes",
        "under a file": tmp_path / "notes" / "run",
        "checkpoints is a file": tmp_path / "old",
    }[kind]
    with tally.bad_input():
        with pytest.raises(WorkdirError, match=f"--workdir={path}"):
            wd.check_usable(str(path))
        with pytest.raises(WorkdirError, match="cannot be used"):
            WorkdirLock(str(tmp_path / "notes" / "run")).acquire()
        assert (tmp_path / "notes").is_file()

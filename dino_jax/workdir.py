"""The work directory of a training run: checked usable before anything is computed, and held
by one trainer at a time.

Every training process holds an exclusive `flock` on its own lock file in the work directory
(`train.lock` for process 0, `train.process<i>.lock` for process i > 0) from before the first
checkpoint is looked at until the run ends. The kernel drops the lock when its process ends in
any way (`kill -9` and crashes included), so a lock file left behind never blocks a later
start; the file's text only says who holds it (pid, host, start time) for the message that a
second trainer gets. Files are never deleted, so two starts always lock the same file.

One lock file per process index: the processes of one multi-host run share the directory and
must not refuse each other, while the process i of a second run meets the process i of the
first. Reading a work directory (evaluation, copying checkpoints) takes no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import IO, Any

_LOG = logging.getLogger(__name__)

# flock errors of file systems that keep no locks (e.g. Lustre mounted without -o flock)
UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class WorkdirError(RuntimeError):
    """A work directory that cannot be used (a file, read-only, held by another trainer)."""


class WorkdirLockedError(WorkdirError):
    """Another trainer holds the work directory."""


def lock_name(process_index: int) -> str:
    """The lock file of one process of a run."""
    return "train.lock" if process_index == 0 else f"train.process{process_index}.lock"


def nearest_existing(path: str) -> str:
    """`path` itself if it exists, else its closest existing ancestor."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def unusable_reason(directory: str, flag: str = "--workdir") -> str | None:
    """Why `directory` (given as `flag`) cannot be created or written, found without touching
    it; None if it looks usable. For a work directory, creating its lock file is the final
    test (see WorkdirLock)."""
    path = os.path.abspath(os.path.expanduser(directory))
    found = nearest_existing(path)
    if not os.path.isdir(found):
        what = "is" if found == path else f"cannot be created: {found} is"
        return f"{flag}={directory} {what} not a directory (a file or a broken link)"
    if not os.access(found, os.W_OK | os.X_OK):
        what = "is not writable" if found == path else f"cannot be created: {found} is not writable"
        return f"{flag}={directory} {what} (read-only or owned by another user)"
    return None


def workdir_problem(workdir: str) -> str | None:
    """Why `workdir` cannot hold a training run, found without touching it; None if it looks
    usable."""
    reason = unusable_reason(workdir)
    if reason:
        return f"{reason}: give a writable --workdir"
    checkpoints = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
    if os.path.lexists(checkpoints) and not os.path.isdir(checkpoints):
        return (
            f"--workdir={workdir} holds {checkpoints}, which is not a directory: this is not a"
            " work directory (give another one)"
        )
    return None


def check_usable(workdir: str) -> None:
    """WorkdirError if `workdir` cannot hold a training run; reads only, creates nothing."""
    problem = workdir_problem(workdir)
    if problem:
        raise WorkdirError(problem)


def holder_record(process_index: int) -> dict[str, Any]:
    """What a lock file says about its holder."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "process_index": process_index,
        "command": " ".join(sys.argv),
    }


def describe_holder(text: str) -> str:
    """A lock file's text as words: 'pid 12 on host h, started ...'."""
    try:
        record = json.loads(text)
        return (
            f"pid {record['pid']} on host {record['host']}, started {record['started']}"
            f" ({record.get('command') or 'command unknown'})"
        )
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


def locked_message(workdir: str, path: str, holder: str) -> str:
    return (
        f"--workdir={workdir} is in use by another trainer: {holder}; lock file {path}. Wait for"
        " that run to end (or stop it), or train in another --workdir. A trainer that died"
        " holds nothing: its lock went with it."
    )


def check_not_held(workdir: str, process_index: int = 0) -> None:
    """WorkdirLockedError if another trainer holds `workdir` now; creates nothing (a start
    asks this before the slow part of its checks, and takes the lock after them)."""
    path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), lock_name(process_index))
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115
    except OSError:
        return  # no lock file, or none readable: WorkdirLock decides
    with f:
        try:
            # shared: it conflicts with a holder's exclusive lock only (and needs no write
            # access where flock is emulated with byte-range locks, as on NFS)
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(f.read())
            raise WorkdirLockedError(locked_message(workdir, path, holder)) from None
        except OSError:
            return  # a file system without locks: WorkdirLock warns
        fcntl.flock(f, fcntl.LOCK_UN)


class WorkdirLock:
    """Create `workdir` if needed and hold its lock for `process_index` (a context manager).

    Raises WorkdirLockedError, naming the holder, if another trainer holds it, and
    WorkdirError if the directory or its lock file cannot be created. Where the file system
    keeps no locks, a warning says so and the run goes on unlocked.
    """

    def __init__(self, workdir: str, process_index: int = 0):
        self.workdir = workdir
        self.path = os.path.join(
            os.path.abspath(os.path.expanduser(workdir)), lock_name(process_index)
        )
        self.process_index = process_index
        self._file: IO[str] | None = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            # "a+": opening must not erase the holder's record before the lock is ours
            f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
        except OSError as err:
            raise WorkdirError(
                f"--workdir={self.workdir} cannot be used: {err.strerror} ({self.path});"
                " give a writable --workdir"
            ) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = describe_holder(f.read())
            f.close()
            raise WorkdirLockedError(locked_message(self.workdir, self.path, holder)) from None
        except OSError as err:
            if err.errno not in UNSUPPORTED:
                f.close()
                raise
            _LOG.warning(
                "the file system of %s keeps no file locks (%s): a second trainer started on"
                " this work directory would not be refused",
                self.workdir,
                err.strerror,
            )
        f.seek(0)
        f.truncate()
        f.write(json.dumps(holder_record(self.process_index)) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        """Clear the holder's record and drop the lock (the file stays, see the module)."""
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            f.seek(0)
            f.truncate()
        except OSError:
            pass  # the lock goes with the file's closing all the same
        f.close()

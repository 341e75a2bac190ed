"""CheckpointSaveError: storage failures recognised, the writes that report them, their message."""

from __future__ import annotations

import errno
import os
import re
import shutil

from dino_jax.checkpoint_resume import CheckpointError


class CheckpointSaveError(CheckpointError):
    """The storage failed while the run saved its work (a checkpoint, the checkpoint history,
    the final evaluation): disk full, I/O error. The message names what failed and the last
    complete checkpoint. The train command exits with status 4."""


# Tensorstore (Orbax's array writer) reports an OS error as `[os_error_code='28']`; Python as
# `[Errno 28]`. Errors without an errno from storage that is not a local disk (a bucket) carry
# one of these status codes.
_ERRNO_IN_TEXT = re.compile(r"os_error_code='(\d+)'|\[Errno (\d+)\]")
_STORAGE_STATUSES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAVAILABLE", "DATA_LOSS")


def _errors_in_chain(err: BaseException) -> list[BaseException]:
    """`err`, its causes and contexts, and the members of exception groups among them."""
    seen, todo = [], [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return seen


def storage_failure(err: BaseException) -> str | None:
    """What failed in the storage (e.g. "No space left on device [ENOSPC]") if `err` comes
    from an operating-system or storage error; None for any other error (a bug)."""
    chain = _errors_in_chain(err)
    for e in chain:
        code = e.errno if isinstance(e, OSError) else None
        if code is None and (match := _ERRNO_IN_TEXT.search(str(e))):
            code = int(match.group(1) or match.group(2))
        if code:
            return f"{os.strerror(code)} [{errno.errorcode.get(code, code)}]"
    for e in chain:
        text = str(e).strip()
        if text.startswith(_STORAGE_STATUSES):
            first = text.splitlines()[0]
            return first if len(first) <= 300 else first[:300] + "..."
    return None


def append_line(path: str, line: str) -> None:
    """Append `line` to a text file in one write, first ending a line that an earlier failed
    write left unfinished (so that the two do not run together into one unreadable line)."""
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        lead = b""
        if end:
            f.seek(end - 1)
            lead = b"" if f.read(1) == b"\n" else b"\n"
        f.write(lead + line.encode("utf-8") + b"\n")


def write_atomically(path: str, text: str, if_failed: str) -> None:
    """Write `path` whole or not at all (a temporary file renamed into place). A storage
    failure raises CheckpointSaveError saying what failed, then `if_failed` (what is safe
    and what to do)."""
    temporary = path + ".tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except OSError as err:
        _remove_quietly(temporary)
        raise CheckpointSaveError(
            f"could not write {path}: {storage_failure(err) or _brief(err)}; {if_failed}"
        ) from None


def _remove_quietly(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError:
        pass


def newest_complete_checkpoint(directory: str, but: int | None = None) -> int | None:
    """The newest complete checkpoint in `directory` (Orbax's step directories are renamed
    into place only when complete), leaving out step `but`."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    steps = [int(n) for n in names if n.isdigit() and int(n) != but]
    return max((s for s in steps if os.path.isdir(os.path.join(directory, str(s)))), default=None)


def _what_is_left(directory: str, last: int | None) -> str:
    """The sentence of a storage-failure message about the last complete checkpoint."""
    if last is None:
        return "No checkpoint is complete yet: a new start trains from step 0."
    return (
        f"The last complete checkpoint is step {last} at {os.path.join(directory, str(last))}"
        " (intact)."
    )


_AGAIN = "Free space (or fix the storage) and run the same command again to resume."


def save_failure_message(step: int, directory: str, why: str, last: int | None) -> str:
    """The message of a failed save of checkpoint `step` in `directory`: which, why, and the
    last complete checkpoint (`last`)."""
    return (
        f"could not save checkpoint {step} to {os.path.join(directory, str(step))}: {why}."
        f" What the save wrote was removed. {_what_is_left(directory, last)} {_AGAIN}"
    )


def storage_error(err: BaseException, workdir: str) -> CheckpointSaveError | None:
    """For a storage failure met outside a checkpoint save (writing a log, say): the error
    naming the file and the last complete checkpoint of `workdir`; None for other errors."""
    why = storage_failure(err)
    if why is None:
        return None
    what = getattr(err, "filename", None) or f"a file of {workdir}"
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    left = _what_is_left(directory, newest_complete_checkpoint(directory))
    return CheckpointSaveError(f"could not write {what}: {why}. {left} {_AGAIN}")


def _brief(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:300] + "..."

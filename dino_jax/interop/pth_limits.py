"""The bounds the .pth reader holds every file to, and the errors it refuses a file with."""

from __future__ import annotations

import reprlib

# A DINO ViT-L/16 checkpoint.pth written by torch.save (student, teacher, AdamW state: 1,508
# tensors) has a data.pkl of 142 kB, 45,974 opcodes, 1,514 zip records and containers nested
# 5 deep; each bound leaves a margin of 20x or more over that.
MAX_PICKLE_BYTES = 16 << 20  # data.pkl (or a plain pickle file), after decompression
MAX_PICKLE_OPCODES = 1 << 20  # every object the unpickler builds takes at least one opcode
MAX_NESTING = 100  # containers inside containers
MAX_ZIP_RECORDS = 1 << 16  # zip directory entries
MAX_ZIP_DIRECTORY_BYTES = 16 << 20
# The storages together may hold at most this many times the bytes of the file on disk plus
# STORAGE_SLACK_BYTES: torch stores records uncompressed (ratio 1), so only a deflated archive
# comes near it, and a zip bomb (or overlapping records) is refused before anything is read.
MAX_STORAGE_INFLATION = 4
STORAGE_SLACK_BYTES = 64 << 20
# Tensors are views of storages. Their elements together may number at most twice those of
# the storages plus VIEW_SLACK_ELEMENTS: shared weights and small expanded (stride-0) tensors
# fit; a stride-0 view claiming more elements than that is refused, never materialised.
MAX_VIEW_RATIO = 2
VIEW_SLACK_ELEMENTS = 1 << 24
MAX_INT_BITS = 2048  # no checkpoint needs larger integers (save_pth writes up to 2040 bits)
MAX_KEY_INT = 1 << 64  # larger ints as dict keys could be made to share one hash at will

_short = reprlib.Repr()  # bounded repr for messages: values from the file can be huge or deep
_short.maxlevel, _short.maxstring, _short.maxother = 3, 60, 60


class PthError(ValueError):
    """The file cannot be read as a checkpoint (damaged, foreign, or over a bound); the
    message names the file."""


class UnsafeCheckpointError(PthError):
    """The file needs something outside the allowlist; it was refused before anything ran."""

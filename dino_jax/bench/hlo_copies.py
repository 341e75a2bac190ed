"""Copies of the donated train state in a compiled step's HLO.

A donated buffer that the step updates in place needs no copy; XLA inserts one (`copy` of the
entry parameter) when it cannot order every read of the old value before the write of the
new one, e.g. when a select reads an old and a new Adam moment of the same tensor. Each such
copy moves the whole buffer every step: `bench step` reports them per setting, and the
optimizer's test keeps the moments free of them."""

from __future__ import annotations

import re

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2}
_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
# `%copy.12 = f32[256,65536]{1,0} copy(%state_opt_state_1__mu__...)`: the jitted function's
# argument named `state` gives its entry parameters names starting with "state"
_COPY = re.compile(r"=\s*(\w+)\[([\d,]*)\][^=]*?\scopy\(%?(state[\w.\-]*)\)")


def state_copies(hlo_text: str) -> dict[str, int]:
    """Entry parameters of the train state copied by `hlo_text` (compiled.as_text()), by
    name, with the bytes each copy moves."""
    copies = {}
    for dtype, dims, name in _COPY.findall(hlo_text):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        copies[name] = copies.get(name, 0) + size * _BYTES.get(dtype, 4)
    return copies


def summary(hlo_text: str) -> dict[str, float]:
    """`state_copies` / `state_copy_mib` for bench step's JSON line."""
    copies = state_copies(hlo_text)
    return {"state_copies": len(copies), "state_copy_mib": sum(copies.values()) / 2**20}

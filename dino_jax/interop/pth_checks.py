"""Bounds on what a .pth pickle builds: the opcode scan before unpickling, the nesting after."""

from __future__ import annotations

import pickletools
import types
from typing import Any

from dino_jax.interop.pth_limits import (
    MAX_INT_BITS,
    MAX_KEY_INT,
    MAX_NESTING,
    MAX_PICKLE_OPCODES,
    PthError,
    UnsafeCheckpointError,
    _short,
)

_KEY_KINDS = frozenset({"int", "int_or_bool", "bool", "str", "bytes_or_str", "bytes", "None"})
_REFUSED_OPCODES = {
    "EXT1": "copyreg extension codes",
    "EXT2": "copyreg extension codes",
    "EXT4": "copyreg extension codes",
    "INST": "protocol-0 instances",
    "OBJ": "protocol-1 instances",
    "NEXT_BUFFER": "out-of-band buffers",
    "READONLY_BUFFER": "out-of-band buffers",
}
_ORDERED_DICT = ("global", "collections OrderedDict")


def _scan_pickle(data: bytes) -> None:
    """Walks the opcodes of ``data`` with a model of the unpickler's stack and memo (kinds of
    values, not the values), refusing what would let a small pickle build something large:
    more than MAX_PICKLE_OPCODES opcodes, memo indices beyond the entries written so far (the
    memo is an array sized by its largest index), integers of more than MAX_INT_BITS bits, dict
    keys and set items other than strings, bytes, ints below MAX_KEY_INT and None (others have
    hashes the file could make collide, making each insertion slow), calls of anything but a
    named global, and OrderedDicts built from arguments."""
    try:
        _walk_opcodes(pickletools.genops(data))
    except ValueError as err:  # genops: truncated or unknown opcodes
        if isinstance(err, PthError):
            raise
        raise PthError(f"cannot read the pickled data ({_short.repr(str(err))[1:-1]})") from None


def _value_kind(kind: str, arg: Any) -> tuple[str, Any]:
    """What the model stack holds for a pushed constant: strings keep their (short) text for
    STACK_GLOBAL, ints too large to be keys are told apart."""
    if kind == "str":
        return ("str", arg if isinstance(arg, str) and len(arg) <= 256 else None)
    if type(arg) is int and not -MAX_KEY_INT < arg < MAX_KEY_INT:
        return ("big int", None)
    return (kind, None)


# Opcodes that only push one constant (most of a pickle), and the mark position (or -1) and
# stack effect of every other opcode, from pickletools' descriptions.
_PUSHES = frozenset(
    op.name
    for op in pickletools.opcodes
    if not op.stack_before
    and len(op.stack_after) == 1
    and op.stack_after[0] is not pickletools.markobject
    and op.stack_after[0] is not pickletools.anyobject
    and op.name not in ("EMPTY_TUPLE", *_REFUSED_OPCODES)
)
_EFFECTS = {
    op.name: (
        op.stack_before.index(pickletools.markobject)
        if pickletools.markobject in op.stack_before
        else -1,
        len(op.stack_before),
        tuple((kind.name, None) for kind in op.stack_after),
    )
    for op in pickletools.opcodes
}


def _check_keys(kinds: list[tuple], what: str) -> None:
    for kind, _ in kinds:
        if kind not in _KEY_KINDS:
            raise UnsafeCheckpointError(
                f"a {what} that is a {kind} object: only strings, bytes, ints and None are allowed"
            )


def _walk_opcodes(opcodes: Any) -> None:
    stack: list[tuple] = []  # (kind, detail) of each value the unpickler would hold
    marks: list[int] = []  # stack heights at each MARK: the unpickler's fences
    memo: dict[int, tuple] = {}

    def pop(n: int) -> list[tuple]:
        if n > len(stack) - (marks[-1] if marks else 0):
            raise PthError("malformed pickle (stack underflow)")
        items = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return items

    for count, (op, arg, _pos) in enumerate(opcodes, start=1):
        if count > MAX_PICKLE_OPCODES:
            raise PthError(f"the pickle has more than {MAX_PICKLE_OPCODES:,} opcodes")
        name = op.name
        if type(arg) is int and arg.bit_length() > MAX_INT_BITS:
            raise PthError(f"an integer of {arg.bit_length():,} bits in the pickle")
        if name in _PUSHES:
            stack.append(_value_kind(op.stack_after[0].name, arg))
            continue
        if name in _REFUSED_OPCODES:
            raise UnsafeCheckpointError(f"pickle opcode {name} ({_REFUSED_OPCODES[name]})")
        mark_at, n_before, after = _EFFECTS[name]
        below: list[tuple] = []
        if mark_at >= 0:
            if not marks:
                raise PthError("malformed pickle (no mark)")
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            below = pop(mark_at)
        else:
            items = pop(n_before)
        pushed: Any = after
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else arg
            if index > len(memo):
                raise PthError(f"pickle memo index {index:,} skips entries ({len(memo)} written)")
            stack.extend(items)
            memo[index] = pop(1)[0]  # the top of the stack, above the current mark
            pushed = [memo[index]]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            if arg not in memo:
                raise PthError(f"malformed pickle (memo entry {arg} read before written)")
            pushed = [memo[arg]]
        elif name == "DUP":
            pushed = items * 2
        elif name == "GLOBAL":
            pushed = [("global", arg)]
        elif name == "STACK_GLOBAL":
            if not all(kind == "str" and isinstance(text, str) for kind, text in items):
                raise PthError("malformed pickle (STACK_GLOBAL without two strings)")
            pushed = [("global", f"{items[0][1]} {items[1][1]}")]
        elif name in ("SETITEM", "SETITEMS", "DICT"):
            if len(items) % 2 and name != "SETITEM":
                raise PthError("malformed pickle (a dict from an odd number of items)")
            _check_keys(items[1:2] if name == "SETITEM" else items[0::2], "dict key")
            pushed = items[:1] if name == "SETITEM" else below or after
        elif name in ("ADDITEMS", "FROZENSET"):
            _check_keys(items, "set item")
            pushed = below or after
        elif name == "REDUCE":
            func, args = items
            if func[0] != "global":
                raise UnsafeCheckpointError(f"a pickle call of a {func[0]}, not of a global")
            if func == _ORDERED_DICT and args != ("tuple", 0):
                raise UnsafeCheckpointError("an OrderedDict built from arguments")
        elif name in ("EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
            pushed = [("tuple", len(items))]
        elif name == "APPENDS":
            pushed = below
        stack.extend(pushed)


def _children(obj: Any) -> list[Any] | None:
    """What a container refers to (None for a leaf), attributes of a dict subclass included."""
    if isinstance(obj, dict):
        kids = [*obj.keys(), *obj.values()]
        attributes = getattr(obj, "__dict__", None)  # an OrderedDict's `_metadata`
        return [*kids, attributes] if attributes else kids
    if isinstance(obj, list | tuple | set | frozenset):
        return list(obj)
    if isinstance(obj, types.SimpleNamespace):
        return [vars(obj)]
    return None


def check_nesting(root: Any, limit: int = MAX_NESTING) -> None:
    """Raise PthError if containers nest more than ``limit`` deep or contain themselves.

    Iterative, and each container is visited once (a shared one is not walked again), so any
    structure the bounded unpickler can build is checked in time linear in its size.
    """
    if _children(root) is None:
        return
    heights: dict[int, int] = {}  # id -> levels from this container down
    on_path = {id(root)}
    frames = [[root, _children(root), 0, 0]]  # container, children, next child, tallest child
    while frames:
        frame = frames[-1]
        container, kids, index, tallest = frame
        if index < len(kids):
            frame[2] += 1
            child = kids[index]
            if id(child) in heights:
                frame[3] = max(tallest, heights[id(child)])
                continue
            grandchildren = _children(child)
            if grandchildren is None:
                continue
            if not grandchildren:  # an empty container: one level, nothing below
                frame[3] = max(frame[3], 1)
                continue
            if id(child) in on_path:
                raise PthError("a container that contains itself")
            if len(frames) >= limit:
                raise PthError(f"containers nested more than {limit} deep")
            on_path.add(id(child))
            frames.append([child, grandchildren, 0, 0])
            continue
        frames.pop()
        on_path.discard(id(container))
        heights[id(container)] = tallest + 1
        if tallest + 1 > limit:
            raise PthError(f"containers nested more than {limit} deep")
        if frames:
            frames[-1][3] = max(frames[-1][3], tallest + 1)

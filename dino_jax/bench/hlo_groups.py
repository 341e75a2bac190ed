"""The compiled step's HLO as the profile reads it: each instruction's opcode, the JAX scopes
it came from, whether it is (or fuses) a matmul, and the op group it belongs to
(dino_jax.bench.profile sums the traced time and kernels of each group)."""

from __future__ import annotations

import collections
import dataclasses
import re

GROUPS = (
    "matmul",
    "attention",
    "norm+elementwise",
    "augmentation",
    "optimizer+EMA",
    "head+loss",
    "other",
)
MATMUL_OPCODES = {"dot", "convolution", "ragged-dot"}
# Opcodes of data movement, collectives and bookkeeping: "other", not elementwise work.
MOVEMENT_OPCODES = {
    "copy",
    "copy-start",
    "copy-done",
    "transpose",
    "bitcast",
    "tuple",
    "get-tuple-element",
    "parameter",
    "constant",
    "all-reduce",
    "all-reduce-start",
    "all-reduce-done",
    "all-gather",
    "all-gather-start",
    "all-gather-done",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-permute-start",
    "collective-permute-done",
    "send",
    "send-done",
    "recv",
    "recv-done",
    "dynamic-slice",
    "dynamic-update-slice",
    "gather",
    "scatter",
    "sort",
    "rng-bit-generator",
    "rng-get-and-update-state",
    "infeed",
    "outfeed",
}
# Opcodes that only reshape or place data; a fusion of these alone is data movement.
SHAPE_OPCODES = {
    "reshape",
    "broadcast",
    "slice",
    "concatenate",
    "pad",
    "reverse",
    "iota",
    "convert",
}
# Kernel names where the HLO says nothing (first match wins).
KERNEL_PATTERNS = (
    ("attention", re.compile(r"fmha|flash|softmax|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cublas|xmma|nvjet|cutlass|wgmma|hmma|matmul|\bdot|conv", re.I)),
    ("other", re.compile(r"memcpy|memset|copy|transpose|nccl|all_reduce|allreduce", re.I)),
    ("norm+elementwise", re.compile(r"fusion|elementwise|reduce|norm|loop_|input_", re.I)),
)


@dataclasses.dataclass(frozen=True)
class HloOp:
    """One instruction of the compiled HLO: its opcode, its `op_name` scopes (several where
    XLA merged ops), its custom-call target and whether it is (or fuses) a matmul."""

    name: str
    opcode: str
    scope: str
    target: str = ""
    matmul: bool = False
    movement: bool = False  # a fusion of copies, slices, concatenations: data movement


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s)}\]])([a-z][a-z0-9\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_CALLS = re.compile(r"calls=(\{[^}]*\}|%?[\w.\-]+)")


def sanitized(name: str) -> str:
    """An HLO name as GPU kernels spell it ("loop_add_fusion.3" -> "loop_add_fusion_3")."""
    return re.sub(r"[.\-]", "_", name)


def hlo_ops(hlo_text: str) -> dict[str, HloOp]:
    """Every instruction of `hlo_text` (compiled.as_text()) by name, and by its sanitized
    name. A fusion is a matmul when a computation it calls (at any depth) holds a dot, data
    movement when they hold only copies, slices and the like; a fusion without `op_name`
    takes the scopes of the instructions it fuses."""
    rows = []
    opcodes = collections.defaultdict(set)  # computation -> the opcodes of its instructions
    scopes = collections.defaultdict(dict)  # computation -> its instructions' op_names
    nested = collections.defaultdict(list)  # computation -> the computations it calls
    computation = ""
    for line in hlo_text.splitlines():
        instruction = _INSTRUCTION.match(line)
        opcode = instruction and _OPCODE.search(instruction.group(2))
        if not opcode:
            header = None if instruction else _COMPUTATION.match(line)
            computation = header.group(1) if header else computation
            continue
        name, rest = instruction.groups()
        called = _CALLS.search(rest)
        calls = re.findall(r"[\w.\-]+", called.group(1).replace("%", "")) if called else []
        target = _TARGET.search(rest)
        scope = ";".join(_OP_NAME.findall(rest))
        rows.append((name, opcode.group(1), scope, target.group(1) if target else "", calls))
        opcodes[computation].add(opcode.group(1))
        scopes[computation].update(dict.fromkeys(scope.split(";") if scope else ()))
        nested[computation].extend(calls)
    memo: dict[str, tuple[frozenset, tuple]] = {}

    def inside(computation: str) -> tuple[frozenset, tuple]:
        """(opcodes, op_names) of `computation` and of those it calls, at any depth."""
        if computation not in memo:
            memo[computation] = (frozenset(), ())  # HLO has no cycles; this bounds a bad text
            found_ops, found_scopes = set(opcodes[computation]), dict(scopes[computation])
            for c in nested[computation]:
                more_ops, more_scopes = inside(c)
                found_ops |= more_ops
                found_scopes.update(dict.fromkeys(more_scopes))
            memo[computation] = (frozenset(found_ops), tuple(found_scopes))
        return memo[computation]

    ops = {}
    for name, opcode, scope, target, calls in rows:
        fused_ops, fused_scopes = set(), {}
        for c in calls:
            more_ops, more_scopes = inside(c)
            fused_ops |= more_ops
            fused_scopes.update(dict.fromkeys(more_scopes))
        op = HloOp(
            name,
            opcode,
            scope or ";".join(fused_scopes),
            target,
            matmul=opcode in MATMUL_OPCODES
            or bool(re.search(r"gemm|matmul|cublas", target, re.I))
            or bool(fused_ops & MATMUL_OPCODES),
            movement=opcode == "fusion" and fused_ops <= MOVEMENT_OPCODES | SHAPE_OPCODES,
        )
        ops.setdefault(sanitized(name), op)
        ops[name] = op
    return ops


def group_of(op: HloOp | None, kernel: str = "") -> str:
    """The group of one traced op: from its HLO scope and opcode, else from `kernel`'s name.

    Scopes first (the augmentation's matmuls are augmentation, the head's are head+loss);
    inside a block's "attn" module its qkv and proj matmuls are matmul, the rest (q k^T,
    softmax, attn v, a fused attention kernel) attention."""
    if op is None:
        return next((group for group, p in KERNEL_PATTERNS if p.search(kernel)), "other")
    tokens = set(re.split(r"[/();,\s]+", op.scope))
    if "augment" in tokens:
        return "augmentation"
    if tokens & {"optimizer", "ema"}:
        return "optimizer+EMA"
    if tokens & {"head", "loss"}:
        return "head+loss"
    if re.search(r"fmha|flash|attention", op.target, re.I):
        return "attention"
    if "attn" in tokens:
        return "matmul" if op.matmul and tokens & {"qkv", "proj"} else "attention"
    if op.matmul:
        return "matmul"
    if op.opcode in MOVEMENT_OPCODES or op.movement or op.opcode == "custom-call":
        return "other"
    return "norm+elementwise"


# Instructions of the entry computation that launch no work of their own.
_BOOKKEEPING = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def entry_ops(hlo_text: str) -> dict[str, int]:
    """The compiled step's top-level ops per group: the instructions of its entry computation
    (fusions, custom calls, copies, collectives; the bookkeeping left out), about one kernel
    each on a GPU before XLA merges sibling fusions."""
    entry = hlo_text[hlo_text.index("\nENTRY") :].split("\n}", 1)[0]
    ops = hlo_ops(hlo_text)
    counts = dict.fromkeys(GROUPS, 0)
    for line in entry.splitlines()[1:]:
        instruction = _INSTRUCTION.match(line)
        op = instruction and ops.get(instruction.group(1))
        if op and op.opcode not in _BOOKKEEPING:
            counts[group_of(op)] += 1
    return counts

"""Where the time of a compiled step goes: a jax.profiler trace of a few steps, its device ops
summed and grouped (matmul, attention, norm+elementwise, augmentation, optimizer+EMA,
head+loss, other).

`dino-jax-bench step --profile DIR` traces and groups; `dino-jax-bench profile DIR [--top N]`
groups the trace in DIR again (with DIR/step_hlo.txt.gz, the step's HLO it wrote there).

Each op of the trace is looked up in the compiled step's HLO (`compiled.as_text()`): the trace
names the op (`hlo_op` on CPU and GPU kernels; on GPUs the kernel name otherwise), the HLO
gives its opcode, what it fuses and its `op_name` metadata, the path of Flax modules and JAX
named scopes it came from (".../backbone/blocks_3/attn/...", ".../augment/...",
".../optimizer/..."). The scope decides the group; where an op is not in the HLO (a cuBLAS or
cuDNN kernel without annotation, a memcpy), its kernel name does (gemm/cublas/xmma -> matmul,
flash/fmha/softmax -> attention, ...).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re

from dino_jax.bench.hlo_groups import GROUPS, HloOp, group_of, hlo_ops, sanitized

# Ops that only run others (their time is their children's): not counted themselves.
CONTROL_FLOW = {"while", "conditional", "call", "async-start", "async-update", "async-done"}
# Trace lines that XProf derives from the device's real ones (they repeat the same time).
DERIVED_LINES = {
    "Steps",
    "XLA Modules",
    "XLA Ops",
    "XLA TraceMe",
    "Framework Name Scope",
    "Framework Ops",
    "TensorFlow Name Scope",
    "TensorFlow Ops",
    "Source code",
    "Launch Stats",
}


def _metadata(events: list[dict], name: str) -> dict:
    """{pid or (pid, tid): name} of the trace's process_name / thread_name records."""
    found = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == name:
            key = e["pid"] if name == "process_name" else (e["pid"], e.get("tid"))
            found[key] = e.get("args", {}).get("name", "")
    return found


def device_events(events: list[dict]) -> list[dict]:
    """The complete ("X") events of one device's ops in a Chrome-format trace.

    A GPU or TPU trace has processes "/device:GPU:0", ...: the first one's CUDA stream lines
    (else its "XLA Ops" line, else its lines but those derived from others). A CPU trace has
    the ops as host events with an `hlo_op` argument, one set per device_ordinal: the
    lowest ordinal's."""
    processes = _metadata(events, "process_name")
    threads = _metadata(events, "thread_name")
    devices = sorted(
        (pid for pid, name in processes.items() if re.match(r"/device:(GPU|TPU)", name)),
        key=lambda pid: (len(processes[pid]), processes[pid]),  # GPU:2 before GPU:10
    )
    complete = [e for e in events if e.get("ph") == "X" and e.get("dur", 0) > 0]
    if devices:
        pid = devices[0]
        lines = {tid: name for (p, tid), name in threads.items() if p == pid}
        streams = {tid for tid, name in lines.items() if name.startswith("Stream")}
        ops_line = {tid for tid, name in lines.items() if name == "XLA Ops"}
        chosen = streams or ops_line or {t for t, n in lines.items() if n not in DERIVED_LINES}
        return [e for e in complete if e["pid"] == pid and e.get("tid") in chosen]
    ops = [e for e in complete if "hlo_op" in e.get("args", {})]
    ordinals = {str(e["args"].get("device_ordinal", "")) for e in ops}
    first = min(ordinals, key=lambda o: (len(o), o)) if ordinals else ""
    return [e for e in ops if str(e["args"].get("device_ordinal", "")) == first]


def exclusive_us(events: list[dict]) -> list[float]:
    """Each event's duration less that of the events nested in it on the same line (a CPU
    while loop's thunk spans its body's), in microseconds."""
    result = [float(e["dur"]) for e in events]
    by_line = collections.defaultdict(list)
    for i, e in enumerate(events):
        by_line[(e.get("pid"), e.get("tid"))].append(i)
    for indices in by_line.values():
        indices.sort(key=lambda i: (events[i]["ts"], -events[i]["dur"]))
        open_events: list[int] = []
        for i in indices:
            start = events[i]["ts"]
            while (
                open_events
                and events[open_events[-1]]["ts"] + events[open_events[-1]]["dur"] <= start
            ):
                open_events.pop()
            if open_events:
                result[open_events[-1]] -= float(events[i]["dur"])
            open_events.append(i)
    return [max(t, 0.0) for t in result]


def op_times(events: list[dict], ops: dict[str, HloOp]) -> list[dict]:
    """Total time and count of each traced op (one device), with its group and scope,
    longest first; control flow (a while loop: its body's ops are counted) left out."""
    device = device_events(events)
    totals: dict[str, list] = {}
    for e, us in zip(device, exclusive_us(device), strict=True):
        name = e.get("args", {}).get("hlo_op") or e.get("name", "")
        op = ops.get(name) or ops.get(sanitized(name))
        if op is not None and op.opcode in CONTROL_FLOW:
            continue
        row = totals.setdefault(name, [0.0, 0, op, e.get("name", "")])
        row[0] += us
        row[1] += 1
    rows = [
        {
            "op": name,
            "group": group_of(op, kernel),
            "us": us,
            "count": count,
            "kernel": kernel if kernel != name else "",
            "scope": op.scope if op else "",
        }
        for name, (us, count, op, kernel) in totals.items()
    ]
    return sorted(rows, key=lambda r: -r["us"])


def summarize(events: list[dict], hlo_text: str, steps: int, top: int = 15) -> dict:
    """Time per step of each group and of the `top` longest ops, in ms, the shares, and the
    kernels (traced ops) each group runs per step."""
    rows = op_times(events, hlo_ops(hlo_text))
    total = sum(r["us"] for r in rows)
    groups = dict.fromkeys(GROUPS, 0.0)
    launches = dict.fromkeys(GROUPS, 0)
    for r in rows:
        groups[r["group"]] += r["us"]
        launches[r["group"]] += r["count"]

    def ms(us: float) -> float:
        return us / 1e3 / steps

    return {
        "steps": steps,
        "device_ms_per_step": ms(total),
        "groups": {
            g: {
                "ms_per_step": ms(us),
                "share": us / total if total else 0.0,
                "kernels_per_step": launches[g] / steps,
            }
            for g, us in sorted(groups.items(), key=lambda kv: -kv[1])
        },
        "top": [
            {**{k: v for k, v in r.items() if k != "us"}, "ms_per_step": ms(r["us"])}
            for r in rows[:top]
        ],
    }


def format_summary(summary: dict) -> str:
    """The summary as text: the groups, then the longest ops."""
    lines = [
        f"device time per step: {summary['device_ms_per_step']:.3f} ms"
        f" (sum over ops, {summary['steps']} traced steps)"
    ]
    for group, g in summary["groups"].items():
        lines.append(
            f"  {group:<17} {g['ms_per_step']:10.3f} ms  {100 * g['share']:5.1f}%"
            f"  {g['kernels_per_step']:8.1f} kernels"
        )
    lines.append("longest ops (ms per step, group, op, scope):")
    for r in summary["top"]:
        label = r["op"] + (f" [{r['kernel'][:60]}]" if r["kernel"] else "")
        lines.append(f"  {r['ms_per_step']:10.3f}  {r['group']:<17} {label}  {r['scope'][-90:]}")
    return "\n".join(lines)


def read_trace(directory: str | pathlib.Path) -> list[dict]:
    """The events of the newest trace jax.profiler wrote under `directory` (its
    perfetto_trace.json.gz, from create_perfetto_trace=True)."""
    traces = sorted(
        pathlib.Path(directory).glob("plugins/profile/*/perfetto_trace.json.gz"),
        key=lambda p: p.stat().st_mtime,
    )
    if not traces:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}/plugins/profile")
    with gzip.open(traces[-1], "rt") as stream:
        return json.load(stream)["traceEvents"]


def profile_steps(compiled, state, batch, key, directory, steps: int = 3, top: int = 15):
    """Trace `steps` calls of `compiled` (already warm) into `directory`, then summarise
    them; writes directory/profile.json and the step's HLO (step_hlo.txt.gz).

    Returns (the state after the steps, the summary)."""
    import jax  # here, so that the report and the re-grouping of a saved trace need no JAX

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    jax.block_until_ready(state)
    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
    hlo_text = compiled.as_text()
    with gzip.open(directory / "step_hlo.txt.gz", "wt") as stream:
        stream.write(hlo_text)
    summary = summarize(read_trace(directory), hlo_text, steps, top)
    (directory / "profile.json").write_text(json.dumps(summary, indent=1) + "\n")
    return state, summary


def main(argv: list[str] | None = None) -> dict:
    import argparse

    p = argparse.ArgumentParser(
        prog="dino-jax-bench profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="the --profile DIR of a `dino-jax-bench step` run")
    p.add_argument("--top", type=int, default=25, help="longest ops to list")
    args = p.parse_args(argv)
    directory = pathlib.Path(args.dir)
    hlo = directory / "step_hlo.txt.gz"
    if not hlo.is_file():
        p.error(f"{hlo}: no such file (give the DIR of `dino-jax-bench step --profile DIR`)")
    previous = json.loads((directory / "profile.json").read_text())
    with gzip.open(hlo, "rt") as stream:
        hlo_text = stream.read()
    try:
        events = read_trace(directory)
    except FileNotFoundError as err:
        p.error(str(err))
    summary = summarize(events, hlo_text, previous.get("steps", 1), args.top)
    print(format_summary(summary))
    return summary

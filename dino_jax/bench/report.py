"""`bench step` JSON lines as markdown tables, ready for docs/performance.md.

dino-jax-bench report bench.jsonl [more.jsonl ...] > bench.md

One row per setting (a failed one says why), then, for the settings traced with --profile,
the share of device time of each op group. Lines that are not JSON objects are skipped, so the
raw output of a benchmark script can be given as it is.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from dino_jax.bench.hlo_groups import GROUPS

COLUMNS = (
    "card",
    "jax",
    "config",
    "setting",
    "batch",
    "images/s pipelined",
    "images/s synced",
    "MFU",
    "compile s",
    "peak GiB",
    "XLA peak GiB",
    "state copies MiB",
    "optimizer ops",
    "command",
)


def read_lines(texts: list[str]) -> list[dict]:
    """The JSON objects among the lines of `texts` (bench step results and errors)."""
    results = []
    for text in texts:
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and "setting" in value:
                results.append(value)
    return results


def _number(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else str(value or "n/a")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def row(result: dict) -> list[str]:
    """The cells of one result, in COLUMNS order."""
    start = [
        result.get("device", "?"),
        result.get("jax", "?"),
        result.get("config", "?"),
        result.get("setting", "?"),
        str(result.get("overrides", {}).get("optim.batch_size", result.get("batch", ""))),
    ]
    end = [f"`{result.get('command', '')}`"]
    if "error" in result:
        reason = " ".join(line.strip() for line in str(result["error"]).splitlines())[:160]
        failed = f"failed ({result.get('stage', '?')}): {reason}"
        return [*start, failed, "", "", "", "", "", "", "", *end]
    mfu = result.get("mfu")
    return [
        *start,
        f"**{_number(result.get('images_per_s_pipelined'), ',.0f')}**",
        _number(result.get("images_per_s_synced"), ",.0f"),
        f"{100 * mfu:.1f}%" if isinstance(mfu, int | float) else "n/a",
        _number(result.get("compile_s"), ".0f"),
        _number(result.get("peak_gib"), ".3g"),
        _number(result.get("xla_peak_gib"), ".3g"),
        _number(result.get("state_copy_mib"), ".3g"),
        _number(result.get("optimizer_ops"), "d"),
        *end,
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in cells) + " |" for cells in rows]
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    """The settings' table, and the profile shares' table where any setting has them."""
    parts = [table(list(COLUMNS), [row(r) for r in results])]
    profiled = [r for r in results if "shares" in r.get("profile", {})]
    if profiled:
        header = ["config", "setting", *GROUPS]
        rows = [
            [r.get("config", "?"), r.get("setting", "?")]
            + [f"{100 * r['profile']['shares'].get(g, 0.0):.1f}%" for g in GROUPS]
            for r in profiled
        ]
        parts += ["Share of device time by op group (`--profile`):", table(header, rows)]
        counted = [r for r in profiled if "kernels_per_step" in r["profile"]]
        rows = [
            [r.get("config", "?"), r.get("setting", "?")]
            + [f"{r['profile']['kernels_per_step'].get(g, 0):.0f}" for g in GROUPS]
            for r in counted
        ]
        if rows:
            parts += ["Kernels per step by op group (`--profile`):", table(header, rows)]
    parts += [
        f"The profile of {r.get('config')} {r.get('setting')} failed: {r['profile']['error']}"
        for r in results
        if "error" in r.get("profile", {})
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(
        prog="dino-jax-bench report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", help="files of bench step JSON lines")
    args = p.parse_args(argv)
    texts = []
    for name in args.files:
        path = pathlib.Path(name)
        if not path.is_file():
            p.error(f"{name}: no such file")
        texts.append(path.read_text(errors="replace"))
    text = markdown(read_lines(texts))
    print(text, end="")
    return text


if __name__ == "__main__":
    main()

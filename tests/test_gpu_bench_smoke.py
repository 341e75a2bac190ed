"""scripts/gpu_bench.sh in its CPU smoke mode (SMOKE=1: a tiny ViT, 2 steps), so that the one
GPU call it is written for does not rot: a JSON line per setting (the base measured, a variant
the CPU refuses reported as an error), the markdown tables, the profile's files, the optional
plain port's output, the summary."""

import json
import os
import pathlib
import subprocess
import sys

from helpers.xla import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_bench.sh"


def test_the_smoke_mode_writes_a_line_per_setting_and_the_tables(tmp_path):
    port = tmp_path / "plain_port_step.py"
    port.write_text("import sys\nprint('plain port:', sys.argv[1:], '1234 images/s')\n")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "SMOKE": "1",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "PLAIN_PORT": str(port),
        "PLAIN_PORT_ARGS": "--batch 8",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags(1),  # one device: the smallest program to compile
        "BUDGET_S": "900",  # a loaded CI machine; the GPU call keeps the default
        "SMOKE_LIMIT_S": "600",
    }
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=960
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "timed out" not in summary and "skipped" not in summary, summary

    lines = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    cudnn = "model.attention=cudnn,model.attention_pad=8"
    assert [r["setting"] for r in lines] == ["base", cudnn]
    base, refused = lines
    assert base["images_per_s_pipelined"] > 0 and base["images_per_s_synced"] > 0
    assert base["profile"]["shares"]["augmentation"] > 0
    # the GPU's cuDNN variant on a CPU: refused, reported in its line, the base unaffected
    assert refused["stage"] == "config" and "needs an NVIDIA GPU" in refused["error"]

    md = (out / "bench.md").read_text()
    assert result.stdout.endswith(md)  # the summary lines, then the tables
    assert "| card | jax | config | setting | batch | images/s pipelined |" in md
    rows = [line for line in md.splitlines() if line.startswith("| 1 x cpu | ")]
    assert [row.split(" | ")[3] for row in rows] == ["base", cudnn]
    assert "| **" in rows[0] and "failed (config): ConfigError: " in rows[1]
    assert "| demo | base | " in md  # the profile's shares
    assert "plain port: ['--batch', '8'] 1234 images/s" in md
    assert "- tiny: exit " in md and "- info: exit 0" in md and "- layouts: exit 0" in md
    layouts = [json.loads(line) for line in (out / "layouts.out").read_text().splitlines()]
    assert [r["layout"] for r in layouts] == ["tensors", "concat", "flat"]
    assert '{"layout": "flat", ' in md

    # what comes back from the device: enough to group the trace again
    trace = out / "profile_tiny"
    assert (trace / "profile.json").is_file() and (trace / "step_hlo.txt.gz").is_file()
    assert list(trace.glob("plugins/profile/*/perfetto_trace.json.gz"))
    assert not list(trace.rglob("*.xplane.pb"))

"""The XLA flags docs/performance.md recommends for overlapping the gradient all-reduce are
flags the installed jaxlib knows: an unknown one aborts the process at start-up."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def documented_flags() -> list[str]:
    text = DOC.read_text()
    (line,) = re.findall(r'^XLA_FLAGS="([^"]+)"$', text, flags=re.M)
    return line.split()


def start_jax(flags: str) -> subprocess.CompletedProcess:
    code = "import jax, jax.numpy as jnp; print(float(jax.jit(jnp.sum)(jnp.ones(4))))"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_documented_flags_start_jax():
    flags = documented_flags()
    assert len(flags) >= 2 and all(f.startswith("--xla_gpu_") for f in flags)
    out = start_jax(" ".join(flags))
    assert out.returncode == 0 and out.stdout.strip() == "4.0", out.stderr[-2000:]


@pytest.mark.parametrize("flag", ["--xla_gpu_enable_async_collectives=true"])
def test_a_flag_jaxlib_no_longer_knows_stops_jax(flag):
    """What the test above guards against: the flag older guides recommend is refused."""
    out = start_jax(flag)
    assert out.returncode != 0 and "Unknown flag" in out.stderr

"""Test set-up: 8 CPU devices for sharding tests, float32 matmuls at full precision."""

import fcntl
import os
import tempfile

from helpers.xla import xla_flags

# Must happen before jax is imported anywhere: sharded code is tested on 8 CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests compile the same small programs (and spawn processes that do): a persistent
# compilation cache, inherited by subprocesses through the environment, compiles each once.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dino_jax_tests_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# The `tally` fixture of the fault-injection tests and the summary line it feeds.
pytest_plugins = ("helpers.fault_tally",)


def pytest_addoption(parser):
    parser.addoption(
        "--runslow",
        action="store_true",
        help="also run the long variants (e.g. >= 10 kills); or set DINO_JAX_LONG_FAULTS=1",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("DINO_JAX_LONG_FAULTS") == "1":
        return
    skip = pytest.mark.skip(reason="long variant: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_multiprocess_run_at_a_time(request):
    """Tests that start several jax.distributed processes take turns (across xdist workers), so
    that two such runs do not share the cores of a small machine."""
    if "multihost" not in request.node.nodeid and "two_processes" not in request.node.name:
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "dino_jax_tests_processes.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES

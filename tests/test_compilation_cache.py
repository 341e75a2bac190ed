"""train.compilation_cache: a second process training the same config loads its step from the
cache folder instead of compiling it; "" sets no folder; an unwritable folder only warns."""

import json
import logging
import os
import subprocess
import sys

import jax
import pytest
from helpers.tiny import tiny_config
from helpers.xla import xla_flags

from dino_jax import compilation_cache
from dino_jax.config import ConfigError
from dino_jax.trainer import train
from dino_jax.validation import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Trains the tiny config for 2 steps once per setting given, in one process; prints, per run,
# the persistent-cache hits JAX logged and what the trainer says compiling cost.
WORKER = """
import json, logging, os, sys
sys.path.insert(0, {tests!r})
from helpers.tiny import tiny_config
from dino_jax.trainer import train

hits = []

class Hits(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("Persistent compilation cache hit for"):
            hits.append(record.getMessage())

compiler = logging.getLogger("jax._src.compiler")
compiler.setLevel(logging.DEBUG)
compiler.addHandler(Hits())
for run, setting in enumerate(json.loads(sys.argv[1])):
    config = tiny_config(**{{"train.max_steps": 2, "train.compilation_cache": setting}})
    result = train(config, os.path.join({workdir!r}, str(run)))
    print("RUN", json.dumps({{"hits": hits, "compiled": result.compiled}}), flush=True)
    hits.clear()
"""


def trained(workdir, cache_root, settings: list[str]) -> list[dict]:
    """One process training once per setting, with the cache root in $DINO_JAX_CACHE and none
    of the test suite's own JAX cache settings."""
    code = WORKER.format(tests=os.path.join(ROOT, "tests"), workdir=str(workdir))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(XLA_FLAGS=xla_flags(1), DINO_JAX_CACHE=str(cache_root), PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(settings)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("RUN ")]


def step_hits(run: dict) -> list[str]:
    return [hit for hit in run["hits"] if "counted_train_step" in hit]


def step_entries(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith("jit_counted_train_step")]


def test_a_second_process_loads_the_step_from_the_cache(tmp_path):
    root = tmp_path / "cache"
    (auto,) = trained(tmp_path / "first", root, ["auto"])
    folder = root / compilation_cache.SUBFOLDER  # "auto" with no JAX folder set: the root's
    assert not step_hits(auto) and len(step_entries(folder)) == 1  # compiled, then written
    (again,) = trained(tmp_path / "second", root, [str(folder)])
    assert len(step_hits(again)) == 1 and len(step_entries(folder)) == 1  # loaded
    # the trainer's own count (TrainResult.compiled, logged at the end): every program of the
    # second start, the step among them, came from the cache; none of the first start's did
    first, second = auto["compiled"], again["compiled"]
    assert first["compile/programs"] > 1 and first["compile/cache_hits"] == 0
    assert first["compile/xla_s"] > 0
    assert second["compile/cache_hits"] == second["compile/programs"] >= 1


@pytest.fixture
def no_jax_cache():
    """This process without a JAX cache folder for the test, then the suite's again."""
    before = jax.config.jax_compilation_cache_dir
    compilation_cache._set_folder(None)
    yield
    compilation_cache._set_folder(before)
    compilation_cache._ours = None


def test_off_sets_no_folder_and_undoes_one_set_before(tmp_path, monkeypatch, no_jax_cache):
    monkeypatch.setenv("DINO_JAX_CACHE", str(tmp_path / "root"))
    assert compilation_cache.configure("") is None
    assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "root").exists()
    folder = str(tmp_path / "root" / compilation_cache.SUBFOLDER)
    assert compilation_cache.configure("auto") == folder == jax.config.jax_compilation_cache_dir
    assert compilation_cache.configure("") is None  # a later run of the same process: off
    assert jax.config.jax_compilation_cache_dir is None


def test_an_unwritable_folder_warns_and_training_goes_on(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    before = jax.config.jax_compilation_cache_dir
    config = tiny_config(**{"train.max_steps": 1, "train.compilation_cache": str(blocker / "x")})
    with caplog.at_level(logging.WARNING, logger="dino_jax.compilation_cache"):
        result = train(config, str(tmp_path / "run"))
    assert int(result.state.step) == 1
    assert "cannot be written" in caplog.text and "training goes on without it" in caplog.text
    assert jax.config.jax_compilation_cache_dir == before  # left as it was


def test_auto_keeps_a_jax_cache_folder_set_by_the_user():
    # the test suite sets JAX_COMPILATION_CACHE_DIR (conftest.py), as a user may
    user = os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert jax.config.jax_compilation_cache_dir == user
    assert compilation_cache.configure("auto") == user
    assert jax.config.jax_compilation_cache_dir == user


def test_compilation_cache_must_be_a_string():
    config = tiny_config()
    config.train.compilation_cache = None
    with pytest.raises(ConfigError, match=r"train\.compilation_cache"):
        validate(config, 1)

"""XLA's persistent compilation cache for training: a restarted or resumed run loads its
compiled step from disk instead of compiling it again (minutes for a large model on a GPU).

`train.compilation_cache`:
- "auto": the folder `xla/` under dino_jax's cache root, the one dino_jax.hub downloads into
  ($DINO_JAX_CACHE, else $XDG_CACHE_HOME/dino_jax, else ~/.cache/dino_jax); when JAX's own
  cache folder is already set (JAX_COMPILATION_CACHE_DIR, or jax.config), that one is kept.
- a folder path: that folder (made if missing).
- "": dino_jax sets no cache (a JAX_COMPILATION_CACHE_DIR of the user's own still applies).

The setting is process-wide JAX configuration: `configure` runs at the start of training,
before the step is compiled. With a folder chosen here, every program is cached whatever its
compile time and size (the train step, and the small programs around it that a restart would
also compile again). Only process 0 of a multi-host run writes entries (JAX's rule); every
process reads its own folder. A folder that cannot be written is warned about and training
goes on without the cache. The cache is trusted code: keep it a folder only you can write.
"""

from __future__ import annotations

import logging
import os
import tempfile

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

AUTO = "auto"
SUBFOLDER = "xla"  # under the cache root
_LOG = logging.getLogger(__name__)
_ours: str | None = None  # the folder this module set in this process, if any


def cache_root() -> str:
    """dino_jax's cache folder (dino_jax.hub's, where released weights are downloaded)."""
    from dino_jax.hub_download import _cache_folder

    return _cache_folder(None)


def wanted_folder(setting: str) -> str | None:
    """The folder `setting` asks for; None for "" and for "auto" while JAX's cache folder
    was set by someone else (the user's setting wins over "auto")."""
    if setting == "":
        return None
    if setting == AUTO:
        current = jax.config.jax_compilation_cache_dir
        if current and current != _ours:
            return None
        return os.path.join(cache_root(), SUBFOLDER)
    return os.path.abspath(os.path.expanduser(setting))


def unwritable(folder: str) -> str | None:
    """Why `folder` cannot hold cache entries (made if missing), or None."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def configure(setting: str) -> str | None:
    """Point JAX's persistent compilation cache at the folder `setting` names (module doc) and
    have it keep every compiled program; returns the folder JAX caches in now, or None."""
    global _ours
    folder = wanted_folder(setting)
    if folder is None:
        if setting == "" and _ours is not None:  # an earlier run of this process set one
            _set_folder(None)
        return jax.config.jax_compilation_cache_dir
    if folder == jax.config.jax_compilation_cache_dir:
        return folder
    problem = unwritable(folder)
    if problem:
        _LOG.warning(
            "the compilation cache folder %s cannot be written (%s): training goes on without"
            " it, compiling the step at every start; set train.compilation_cache to a writable"
            ' folder, or to "" to turn it off',
            folder,
            problem,
        )
        if _ours is not None:
            _set_folder(None)
        return None
    _set_folder(folder)
    # every program, whatever its compile time or size (-1: no size floor, JAX's own included)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _LOG.info("compiled programs are cached in %s", folder)
    return folder


def _set_folder(folder: str | None) -> None:
    """Make JAX read and write its cache in `folder` (None: no cache) from the next compile,
    also when an earlier compile of this process already opened another folder."""
    global _ours
    jax.config.update("jax_compilation_cache_dir", folder)
    # JAX opens its cache folder once, at the first compile after; its note of the reset
    # (an INFO line at every start) is left out
    jax_log = logging.getLogger("jax._src.compilation_cache")
    level = jax_log.level
    jax_log.setLevel(max(level, logging.WARNING))
    try:
        jax_cache.reset_cache()
    finally:
        jax_log.setLevel(level)
    _ours = folder


# JAX's monitoring events (jax._src.dispatch and jax._src.compiler): the time to trace a
# function and lower it to XLA (never cached), the time XLA's backend compile takes (on a
# cache hit, the time to load the entry), and one event per program found in the cache.
TRACE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
)
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileTimes:
    """What compiling cost while the context is open, from JAX's monitoring events: seconds
    in XLA's backend (`xla_s`; entries loaded from the cache count their load time), seconds
    tracing and lowering (`trace_s`), programs compiled or loaded (`programs`) and loaded from
    the persistent cache (`cache_hits`). Listeners are registered on entry, removed on exit."""

    def __init__(self):
        self.xla_s = 0.0
        self.trace_s = 0.0
        self.programs = 0
        self.cache_hits = 0

    def _duration(self, event: str, seconds: float, **_) -> None:
        if event == BACKEND_EVENT:
            self.xla_s += seconds
            self.programs += 1
        elif event in TRACE_EVENTS:
            self.trace_s += seconds

    def _event(self, event: str, **_) -> None:
        if event == HIT_EVENT:
            self.cache_hits += 1

    def __enter__(self) -> CompileTimes:
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._duration)
        jax.monitoring.unregister_event_listener(self._event)

    def summary(self) -> dict[str, float]:
        return {
            "compile/xla_s": round(self.xla_s, 3),
            "compile/trace_s": round(self.trace_s, 3),
            "compile/programs": self.programs,
            "compile/cache_hits": self.cache_hits,
        }

    def describe(self) -> str:
        return (
            f"compiling took {self.xla_s:.1f} s in XLA and {self.trace_s:.1f} s tracing and"
            f" lowering: {self.programs} programs, {self.cache_hits} loaded from the cache"
        )

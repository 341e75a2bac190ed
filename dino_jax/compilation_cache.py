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
    from dino_jax.hub import _cache_folder

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
    jax_cache.reset_cache()  # JAX opens its cache folder once, at the first compile after
    _ours = folder

"""A frozen backbone for evaluation, from a dino_jax work directory or an official `.pth` file.

Work directories give the latest checkpoint's teacher (or student) and the config it was
trained with; official files give their backbone (ViT, ResNet or XCiT) and the ImageNet
normalisation it was trained with.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dino_jax import recipe
from dino_jax.config import default_config, dotted
from dino_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD  # eval scripts' Normalize()
from dino_jax.interop.official import backbone_module, load_official
from dino_jax.interop.pth import UnsafeCheckpointError
from dino_jax.models.backbones import size_multiple
from dino_jax.recipe import attention_implementation
from dino_jax.state import variables

_LOG = logging.getLogger(__name__)
WHICH = ("teacher", "student")


class WeightsError(ValueError):
    """The weights path cannot be read as a work directory or an official checkpoint."""


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """Where the backbone came from and how its inputs must be prepared."""

    source: str  # "workdir" | "pth"
    path: str
    which: str  # "teacher" | "student"
    step: int | None  # training step (work directory) or epoch (full official checkpoint)
    patch_size: int  # what each input side must be a multiple of (1: any size)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: ml_collections.ConfigDict | None  # the training config (work directories only)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly identity, stored beside cached features and results."""
        return {
            "weights": os.path.abspath(self.path),
            "source": self.source,
            "which": self.which,
            "step": self.step,
        }


def config_from_flat(flat: dict[str, Any]) -> ml_collections.ConfigDict:
    """`config.flatten_config` output back onto `default_config()`.

    JSON turned tuples into lists; keys the current code no longer has are skipped with a
    warning, so an older work directory still evaluates.
    """
    config = default_config()
    for key, value in flat.items():
        try:
            node, leaf = dotted(config, key)
            current = node[leaf]
        except KeyError:
            _LOG.warning("saved config key %s is unknown here; ignored", key)
            continue
        if isinstance(value, list) or isinstance(current, tuple):
            value = tuple(value) if value is not None else value
        node[leaf] = value
    return config


def _checkpoint_dir(path: str) -> str:
    """`<workdir>/checkpoints`, also when `path` is that directory itself (absolute: Orbax
    refuses relative paths)."""
    path = os.path.abspath(path)
    inner = os.path.join(path, "checkpoints")
    if os.path.isdir(inner):
        return inner
    if os.path.basename(os.path.normpath(path)) == "checkpoints":
        return path
    raise WeightsError(
        f"{path} is a directory without a checkpoints/ sub-directory: give a dino_jax work"
        " directory (the --workdir of train.py) or an official .pth file"
    )


def _restore_workdir(path: str, which: str):
    import orbax.checkpoint as ocp

    directory = _checkpoint_dir(path)
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_names=("state", "meta"),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    try:
        step = manager.latest_step()
        if step is None:
            raise WeightsError(
                f"{directory} holds no finished checkpoint yet (training writes one every"
                " train.checkpoint_every_steps steps and at the end)"
            )
        tree = _read(directory, step, lambda: manager.item_metadata(step)["state"].tree)
        if which not in tree or "backbone" not in tree[which]:
            raise WeightsError(f"checkpoint {step} in {directory} has no {which} backbone")
        # Only the wanted backbone (and its BatchNorm statistics, if it has any) is read (a
        # partial restore), as host arrays: no optimiser moments, no head, and no dependence
        # on the devices the run was saved from.
        target = {which: {"backbone": tree[which]["backbone"]}}
        stats = f"{which}_stats"
        if "backbone" in (tree.get(stats) or {}):
            target[stats] = {"backbone": tree[stats]["backbone"]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            ),
            meta=ocp.args.JsonRestore(),
        )
        restored = _read(directory, step, lambda: manager.restore(step, args=args))
    finally:
        manager.close()
    meta = dict(restored.meta)
    if "config" not in meta:
        raise WeightsError(f"checkpoint {step} in {directory} has no saved config in its meta")
    state = restored.state
    found = variables(state[which]["backbone"], state.get(f"{which}_stats", {}).get("backbone"))
    return step, found, config_from_flat(meta["config"])


def _read(directory: str, step: int, fn):
    try:
        return fn()
    except Exception as err:  # orbax raises many types for damaged or foreign checkpoints
        raise WeightsError(
            f"checkpoint {step} in {directory} cannot be read ({type(err).__name__}: {err})"
        ) from err


def load_weights(
    path: str | os.PathLike[str],
    *,
    which: str = "teacher",
    num_heads: int | None = None,
    dtype: str | None = "float32",
) -> tuple[Any, dict[str, Any], WeightsInfo]:
    """(backbone, variables, info) for `model.apply(variables, images)`.

    `path`: a work directory (its latest checkpoint), an official full `checkpoint.pth` /
    backbone `*_pretrain.pth`, or a released model's name (`dino_vits16`, ...:
    dino_jax.hub.names()), downloaded once. `which`: the teacher (what the official
    evaluations use) or the student. `num_heads`: only for official files whose width is not
    an official size. `dtype`: compute dtype; float32 as the official evaluation scripts,
    None keeps the training config's (work directories).
    """
    path = os.fspath(path)
    if which not in WHICH:
        raise WeightsError(f"which={which!r}: use one of {WHICH}")
    path = _released_file(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path} does not exist: give a work directory or a .pth file")
    if os.path.isdir(path):
        step, backbone_vars, config = _restore_workdir(path, which)
        if dtype is not None:
            config.model.compute_dtype = dtype
        backbone = recipe.build_network(config).backbone
        params = jax.tree.map(
            lambda x: np.asarray(x, config.model.param_dtype), backbone_vars["params"]
        )
        info = WeightsInfo(
            source="workdir",
            path=path,
            which=which,
            step=int(step),
            patch_size=size_multiple(backbone),
            mean=tuple(config.aug.mean),
            std=tuple(config.aug.std),
            config=config,
        )
        return backbone, {**backbone_vars, "params": params}, info
    return _load_pth(path, which, num_heads, dtype)


def _released_file(path: str) -> str:
    """`path`, or for a released model's name (dino_jax.hub.names()) and no such file here,
    its official file, downloaded once into the hub's cache."""
    from dino_jax import hub

    if path not in hub.names() or os.path.exists(path):
        return path
    try:
        return hub.download(path)
    except hub.HubError as err:
        raise WeightsError(str(err)) from None


def _load_pth(path: str, which: str, num_heads: int | None, dtype: str | None):
    try:
        ckpt = load_official(path)
    except UnsafeCheckpointError:
        raise  # a refused pickle says why itself; it must not read as "not a checkpoint"
    except Exception as err:  # not a zip, not a pickle, not DINO: the reader raises many types
        raise WeightsError(
            f"{path} is not a readable official DINO checkpoint ({type(err).__name__}: {err})"
        ) from err
    params = ckpt.teacher if which == "teacher" else ckpt.student
    if params is None:
        raise WeightsError(f"{path} holds no {which} network (a backbone-only file: use teacher)")
    stats = ckpt.teacher_stats if which == "teacher" else ckpt.student_stats
    compute = jnp.dtype(dtype or "float32")
    try:
        backbone = backbone_module(
            ckpt.architecture,
            num_heads=num_heads,
            args=ckpt.args,
            dtype=compute,
            attention_impl=attention_implementation("auto"),
        )
    except ValueError as err:
        raise WeightsError(f"{path}: {err} (--num_heads)") from err
    info = WeightsInfo(
        source="pth",
        path=path,
        which=which,
        step=ckpt.epoch,
        patch_size=size_multiple(backbone),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        config=None,
    )
    return backbone, variables(params["backbone"], (stats or {}).get("backbone")), info

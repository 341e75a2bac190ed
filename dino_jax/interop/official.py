"""Official DINO checkpoints in: full `checkpoint.pth` and backbone `*_pretrain.pth` of a
ViT, a ResNet or an XCiT (export: official_export.py, re-exported here).

Reading goes through `pth.open_pth` (no PyTorch, no code from the file): the pickle is read
first, the shapes of the state dicts are checked against the architecture (official_shapes.py:
the configured model's, or the one the file's own tensors declare), and only then are the
tensors that are used read. Architecture sizes are read off the tensor shapes; only a ViT's
number of heads is not in the shapes: it comes from an argument, the checkpoint's
`args.arch`, or the official size for the width. BatchNorm buffers come back as Flax
`batch_stats` trees.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from dino_jax.interop import architecture
from dino_jax.interop.architecture import AnyArchitecture
from dino_jax.interop.architecture_common import flag_value
from dino_jax.interop.official_export import (
    official_state_dict,
    save_official_backbone,
    save_official_checkpoint,
)
from dino_jax.interop.official_models import (
    HEADS_BY_WIDTH,
    backbone_module,
    infer_backbone,
    infer_head,
)
from dino_jax.interop.official_shapes import (
    FileContents,
    OfficialCheckpointError,
    check_shapes,
    file_architecture,
    tensor_shape,
)
from dino_jax.interop.pth import Namespace, PthError, PthFile, open_pth
from dino_jax.interop.state_dict import BN_BUFFERS, from_state_dict
from dino_jax.models.backbones import family

__all__ = [
    "HEADS_BY_WIDTH",
    "OfficialCheckpoint",
    "OfficialCheckpointError",
    "backbone_module",
    "check_init_from",
    "infer_backbone",
    "infer_head",
    "load_backbone",
    "load_official",
    "official_state_dict",
    "save_official_backbone",
    "save_official_checkpoint",
]

# The storages read for the tensors used may hold at most this much more than those tensors
# (a small weight that is a view into a huge storage would otherwise read all of it).
MAX_STORAGE_OVERHEAD = 2
STORAGE_OVERHEAD_SLACK = 64 << 20


@dataclasses.dataclass
class OfficialCheckpoint:
    """What an official file holds, as our param trees ({'backbone': ..., 'head': ...}) and
    the Flax `batch_stats` trees of the same networks ({} without BatchNorm: a ViT with a
    plain head; each network has its own, as the official teacher keeps its own buffers)."""

    teacher: dict[str, Any]  # the network to evaluate; a backbone-only file fills 'backbone'
    student: dict[str, Any] | None = None
    center: np.ndarray | None = None  # (1, K)
    epoch: int | None = None
    args: Namespace | None = None
    adam: dict[str, dict[str, np.ndarray]] | None = None  # student name -> its optimiser state
    teacher_stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    student_stats: dict[str, Any] | None = None  # None with the student
    architecture: AnyArchitecture | None = None  # what the file's own tensors declare


def _state_dict(obj: Any, what: str, path: str) -> dict[str, Any]:
    """A state dict with or without DDP/wrapper prefixes, as backbone.* / head.* names."""
    if not isinstance(obj, Mapping):
        raise OfficialCheckpointError(
            f"{path}: the {what} is a {type(obj).__name__}, not a state dict (names -> tensors)"
        )
    state = {}
    for name, value in obj.items():
        if not isinstance(name, str) or tensor_shape(value) is None:
            raise OfficialCheckpointError(
                f"{path}: the {what} state dict has an entry {name!r:.80} that is not a "
                f"tensor ({type(value).__name__})"
            )
        if name.removeprefix("module.") in state:
            raise OfficialCheckpointError(
                f"{path}: the {what} state dict holds {name!r:.80} with and without 'module.'"
            )
        state[name.removeprefix("module.")] = value
    if not any(k.startswith("backbone.") for k in state):
        if "cls_token" not in state and "conv1.weight" not in state:
            raise OfficialCheckpointError(
                f"{path}: the {what} state dict has no DINO backbone (no 'cls_token' entry "
                "of a ViT or XCiT, no 'conv1.weight' of a ResNet, with or without "
                "'backbone.'); is this a DINO checkpoint?"
            )
        state = {"backbone." + k: v for k, v in state.items()}
    return state


def _contents(raw: Any, path: str) -> FileContents:
    if not isinstance(raw, Mapping):
        raise OfficialCheckpointError(
            f"{path}: expected a dict of tensors, found {type(raw).__name__}"
        )
    if "teacher" not in raw:  # backbone-only files (*_pretrain.pth), maybe under one key
        state = raw.get("state_dict", raw.get("model", raw))
        teacher = _state_dict(state, "backbone", path)
        return FileContents(teacher, None, None, None, None, None, None)
    teacher = _state_dict(raw["teacher"], "teacher", path)
    student_raw = raw.get("student")
    student = None if student_raw is None else _state_dict(student_raw, "student", path)
    loss = raw.get("dino_loss", {})
    if not isinstance(loss, Mapping):
        raise OfficialCheckpointError(f"{path}: dino_loss is a {type(loss).__name__}, not a dict")
    center = loss.get("center")
    if center is not None and tensor_shape(center) is None:
        raise OfficialCheckpointError(f"{path}: dino_loss.center is not a tensor")
    epoch = raw.get("epoch")
    if epoch is not None and (type(epoch) is not int or epoch < 0):
        raise OfficialCheckpointError(f"{path}: epoch {epoch!r:.40} is not a non-negative int")
    args = raw.get("args")
    optimizer = raw.get("optimizer") if student is not None else None
    return FileContents(
        teacher=teacher,
        student=student,
        student_raw=student_raw,
        center=center,
        epoch=epoch,
        args=args if isinstance(args, Namespace) else None,
        optimizer=optimizer,
    )


def _adam_names(student_state: Mapping[str, Any], norm_last_layer: bool) -> list[str]:
    """Student parameter names in the order of the AdamW state.

    PyTorch keys it by position in the param groups of utils.get_params_groups: first every
    trainable weight (>= 2-D, not a bias), then biases and 1-D params, each in
    named_parameters order (= state-dict order without buffers).
    """
    names = [
        n
        for n in student_state
        if n.rsplit(".", 1)[-1] not in BN_BUFFERS
        and not (norm_last_layer and n.endswith("last_layer.weight_g"))
    ]
    decayed = [
        n for n in names if not n.endswith(".bias") and len(tensor_shape(student_state[n])) > 1
    ]
    others = [n for n in names if n not in set(decayed)]
    return decayed + others


def _adam_state(contents: FileContents, path: str) -> dict[int, tuple[str, Mapping[str, Any]]]:
    """Index -> (parameter name, its AdamW state), each tensor checked against the parameter."""
    optimizer = contents.optimizer
    state = optimizer.get("state", {}) if isinstance(optimizer, Mapping) else None
    if not isinstance(state, Mapping):
        raise OfficialCheckpointError(f"{path}: the optimizer entry is not an optimizer state dict")
    flag = getattr(contents.args, "norm_last_layer", True)
    names = _adam_names(contents.student_raw, flag if isinstance(flag, bool) else True)
    out = {}
    for index, entry in state.items():
        if type(index) is not int or not 0 <= index < len(names) or not isinstance(entry, Mapping):
            raise OfficialCheckpointError(
                f"{path}: optimizer state does not match the student's parameters"
            )
        name = names[index]
        expected = tensor_shape(contents.student_raw[name])
        for key, value in entry.items():
            shape = tensor_shape(value)
            if shape is not None and not (
                math.prod(shape) <= 1 if key == "step" else shape == expected
            ):
                raise OfficialCheckpointError(
                    f"{path}: optimizer state {key!r:.40} of {name} has shape {shape}, the "
                    f"parameter {expected}"
                )
        out[index] = (name, entry)
    return out


def _used_tensors(contents: FileContents, networks: Collection[str], adam: dict | None) -> list:
    tensors = [*contents.teacher.values()] if "teacher" in networks else []
    tensors += [*(contents.student or {}).values()] if "student" in networks else []
    tensors += [contents.center] if contents.center is not None else []
    for _, entry in (adam or {}).values():
        tensors += [v for v in entry.values() if tensor_shape(v) is not None]
    return tensors


def _storages_to_read(pth: PthFile, tensors: list[Any], path: str) -> set[str]:
    """The storage keys of `tensors`, refused when they hold much more than the tensors."""
    keys = {t.storage for t in tensors}
    needed = sum({id(t): t.nbytes for t in tensors}.values())
    reading = sum(pth.storage_sizes[k] for k in keys)
    if reading > MAX_STORAGE_OVERHEAD * needed + STORAGE_OVERHEAD_SLACK:
        raise OfficialCheckpointError(
            f"{path}: its weights ({needed:,} bytes) are views into storages of {reading:,} "
            "bytes; re-save the state dict with contiguous tensors"
        )
    return keys


# What the families that no official DINO file can start are (their parameters are neither
# a DINO ViT's, a ResNet's nor an XCiT's), for the refusal.
_NOT_STARTED_BY_OFFICIAL = {
    "dinov2": "DINOv2's ViT, with a mask token (and registers, LayerScale, SwiGLU) that no"
    " official DINO file holds",
    "dinov3": "DINOv3's RoPE ViT, which has no learned position embedding (a rotary embedding"
    " in every block gives its positions)",
}


def _file_settings(found: AnyArchitecture, model_config: Any, img_size: int | None) -> str:
    """The command-line settings that configure the architecture a file holds, those that
    differ from the configured ones."""
    configured = {"aug.global_size": img_size}
    flags = []
    for key, value in architecture.settings_for(found).items():
        section, _, leaf = key.partition(".")
        ours = getattr(model_config, leaf, None) if section == "model" else configured.get(key)
        if (tuple(ours) if isinstance(ours, list) else ours) != value:
            flags.append(f"--config.{key}={flag_value(value)}")
    return " ".join(flags)


def _refuse_unstartable_family(
    contents: FileContents, path: str, model_config: Any, img_size: int | None
) -> None:
    """OfficialCheckpointError when the configured model is of a family that no official DINO
    file can start (DINOv2's or DINOv3's ViT), naming what the file holds and what to do."""
    try:
        kind = family(model_config.arch)
    except (AttributeError, TypeError, ValueError):
        return  # not a known architecture: the shape check says so
    if kind not in _NOT_STARTED_BY_OFFICIAL:
        return
    found = file_architecture(contents)
    pos = tensor_shape(contents.teacher.get("backbone.pos_embed"))
    ours = f"model.arch={model_config.arch!r} is {_NOT_STARTED_BY_OFFICIAL[kind]}"
    if kind == "dinov3" and pos is not None:
        why = (
            f"it holds a ViT with a learned position embedding (backbone.pos_embed {pos}), as"
            f" every official DINO ViT does, and {ours}, so this file cannot start it"
        )
    elif found is not None:
        why = f"it holds {architecture.describe(found)}, and {ours}: no official file starts it"
    else:
        why = f"{ours}: no official DINO file starts it"
    fix = "leave init_from empty to train it from its initialisation"
    if found is not None:
        flags = _file_settings(found, model_config, img_size)
        fix += (
            f", or train the file's own architecture from it: {flags} (with"
            " model.num_register_tokens, layerscale_init, ffn and the rope_* settings at their"
            " defaults)"
        )
    raise OfficialCheckpointError(f"{path}: {why}: {fix}")


def _plan(
    path: str, model_config: Any, img_size: int | None, networks: Collection[str], optimizer: bool
) -> tuple[PthFile, set[str]]:
    """The checked file and the storages to read, from the pickle alone."""
    pth = open_pth(path)
    contents = _contents(pth.tree, path)
    if model_config is not None:
        _refuse_unstartable_family(contents, path, model_config, img_size)
    check_shapes(contents, path, model_config, img_size)
    adam = _adam_state(contents, path) if optimizer and contents.optimizer is not None else None
    return pth, _storages_to_read(pth, _used_tensors(contents, networks, adam), path)


def _trees(state: Mapping[str, Any], what: str, path: str) -> tuple[dict, dict]:
    try:
        return from_state_dict(state)
    except ValueError as err:  # a num_batches_tracked that is no count
        raise OfficialCheckpointError(f"{path}: the {what}'s {err}") from None


def load_official(
    path: str | os.PathLike[str],
    model_config: Any = None,
    *,
    img_size: int | None = None,
    networks: Collection[str] = ("teacher", "student"),
    optimizer: bool = False,
) -> OfficialCheckpoint:
    """Read an official full checkpoint or a backbone-only state dict into param trees and
    batch_stats trees (BatchNorm buffers: `teacher_stats`, `student_stats`).

    With `model_config` (a config's `model` section) every tensor must have the shape of that
    model (`img_size`, the crop size, fixes the position embedding); without, the shapes the
    file's own tensors declare. Both are checked from the pickle, before any tensor is read.
    Then only what is asked for is read: the `networks` ("teacher", "student"; one left out
    comes back as {} or None) and the optimiser state with `optimizer` (AdamW's, or SGD's /
    LARS's `momentum_buffer`, by student parameter name).
    Raises OfficialCheckpointError (or PthError, UnsafeCheckpointError) naming the file.
    """
    path = os.path.expanduser(os.fspath(path))
    pth, keys = _plan(path, model_config, img_size, networks, optimizer)
    contents = _contents(pth.load(keys), path)
    ckpt = OfficialCheckpoint(
        {}, epoch=contents.epoch, args=contents.args, architecture=file_architecture(contents)
    )
    if "teacher" in networks:
        ckpt.teacher, ckpt.teacher_stats = _trees(contents.teacher, "teacher", path)
    if contents.student is not None and "student" in networks:
        ckpt.student, ckpt.student_stats = _trees(contents.student, "student", path)
    if contents.center is not None:
        ckpt.center = np.asarray(contents.center, np.float32)
    if optimizer and contents.optimizer is not None:
        adam = _adam_state(contents, path)
        ckpt.adam = {name: {k: np.asarray(v) for k, v in s.items()} for name, s in adam.values()}
    return ckpt


def check_init_from(path: str, model_config: Any, img_size: int | None = None) -> None:
    """Raise OfficialCheckpointError unless `path` is an official DINO checkpoint that
    `--config.init_from` can start the configured model from.

    `model_config` is `config.model`; `img_size` (`config.aug.global_size`) fixes the position
    embedding, as the trainer needs it exactly. Reads the zip directory and the pickle only
    (about a millisecond per 100 tensors), never the tensor storages, so a file can be checked
    before any work directory is made and then loaded with `load_official`.
    """
    try:
        path = os.path.expanduser(os.fspath(path))
        _plan(path, model_config, img_size, ("teacher", "student"), optimizer=False)
    except OfficialCheckpointError as err:
        raise OfficialCheckpointError(f"init_from: {err}") from None
    except PthError as err:
        raise OfficialCheckpointError(
            f"init_from: {str(err).rstrip('.')}. Give an official DINO checkpoint (checkpoint.pth "
            "or a *_pretrain.pth backbone) or leave init_from empty"
        ) from None


def load_backbone(
    path: str | os.PathLike[str], *, num_heads: int | None = None, which: str = "teacher", **kw
):
    """(backbone, variables) ready for `backbone.apply(variables, images)`: a
    VisionTransformer, ResNet or XCiT, as the file's tensors declare; `variables` holds
    `batch_stats` too when the backbone has BatchNorm (apply it with the default
    use_running_average=True, as the official evaluations run it in eval mode).

    `which` picks the teacher (the network the official evaluations use) or the student of a
    full checkpoint; `kw` overrides module fields (dtype, attention_impl, ...); `num_heads`
    is a ViT's, when its width is not an official one.
    """
    ckpt = load_official(path, networks=(which,))
    params = ckpt.teacher if which == "teacher" else ckpt.student
    stats = ckpt.teacher_stats if which == "teacher" else ckpt.student_stats
    if params is None:
        raise ValueError(f"{os.fspath(path)} holds no {which} network")
    model = backbone_module(ckpt.architecture, num_heads=num_heads, args=ckpt.args, **kw)
    variables = {"params": params["backbone"]}
    if (stats or {}).get("backbone"):
        variables["batch_stats"] = stats["backbone"]
    return model, variables

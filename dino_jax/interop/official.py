"""Official DINO checkpoints in: full `checkpoint.pth` and backbone `*_pretrain.pth` of a
ViT, a ResNet or an XCiT (export: official_export.py, re-exported here).

Reading goes through `pth.open_pth` (no PyTorch, no code from the file): the pickle is read
first, the shapes of the state dicts are checked against the architecture (the configured
model's, or the one the file's own tensors declare), and only then are the tensors that are
used read. Architecture sizes are read off the tensor shapes; only a ViT's number of heads
is not in the shapes: it comes from an argument, the checkpoint's `args.arch`, or the
official size for the width. BatchNorm buffers come back as Flax `batch_stats` trees.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from dino_jax.interop import architecture
from dino_jax.interop.architecture import AnyArchitecture, Architecture
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
from dino_jax.interop.pth import Namespace, PthError, PthFile, TensorInfo, open_pth
from dino_jax.interop.state_dict import BN_BUFFERS, from_state_dict
from dino_jax.models.vit import ARCHS

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

# Weights and BatchNorm statistics are floating point; an int or bool "weight" is damage.
FLOAT_DTYPES = frozenset(
    np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)
)
# The storages read for the tensors used may hold at most this much more than those tensors
# (a small weight that is a view into a huge storage would otherwise read all of it).
MAX_STORAGE_OVERHEAD = 2
STORAGE_OVERHEAD_SLACK = 64 << 20
_SHOWN = 6  # differences listed in a message


class OfficialCheckpointError(PthError):
    """The file is not an official DINO checkpoint this code can use (or not one of the
    configured model); the message names the file, what is wrong and what to do."""


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


def _shape(value: Any) -> tuple[int, ...] | None:
    """The shape of a tensor (read or not), None for anything else."""
    if isinstance(value, TensorInfo | np.ndarray):
        return tuple(value.shape)
    return None


@dataclasses.dataclass
class _Contents:
    """The parts of an official file, checked for type (tensors may be TensorInfo)."""

    teacher: dict[str, Any]  # normalised names: backbone.* / head.*
    student: dict[str, Any] | None
    student_raw: Mapping[str, Any] | None  # as saved (the optimiser is keyed by these names)
    center: Any
    epoch: int | None
    args: Namespace | None
    optimizer: Mapping[str, Any] | None


def _state_dict(obj: Any, what: str, path: str) -> dict[str, Any]:
    """A state dict with or without DDP/wrapper prefixes, as backbone.* / head.* names."""
    if not isinstance(obj, Mapping):
        raise OfficialCheckpointError(
            f"{path}: the {what} is a {type(obj).__name__}, not a state dict (names -> tensors)"
        )
    state = {}
    for name, value in obj.items():
        if not isinstance(name, str) or _shape(value) is None:
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


def _contents(raw: Any, path: str) -> _Contents:
    if not isinstance(raw, Mapping):
        raise OfficialCheckpointError(
            f"{path}: expected a dict of tensors, found {type(raw).__name__}"
        )
    if "teacher" not in raw:  # backbone-only files (*_pretrain.pth), maybe under one key
        state = raw.get("state_dict", raw.get("model", raw))
        teacher = _state_dict(state, "backbone", path)
        return _Contents(teacher, None, None, None, None, None, None)
    teacher = _state_dict(raw["teacher"], "teacher", path)
    student_raw = raw.get("student")
    student = None if student_raw is None else _state_dict(student_raw, "student", path)
    loss = raw.get("dino_loss", {})
    if not isinstance(loss, Mapping):
        raise OfficialCheckpointError(f"{path}: dino_loss is a {type(loss).__name__}, not a dict")
    center = loss.get("center")
    if center is not None and _shape(center) is None:
        raise OfficialCheckpointError(f"{path}: dino_loss.center is not a tensor")
    epoch = raw.get("epoch")
    if epoch is not None and (type(epoch) is not int or epoch < 0):
        raise OfficialCheckpointError(f"{path}: epoch {epoch!r:.40} is not a non-negative int")
    args = raw.get("args")
    optimizer = raw.get("optimizer") if student is not None else None
    return _Contents(
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
    decayed = [n for n in names if not n.endswith(".bias") and len(_shape(student_state[n])) > 1]
    others = [n for n in names if n not in set(decayed)]
    return decayed + others


def _adam_state(contents: _Contents, path: str) -> dict[int, tuple[str, Mapping[str, Any]]]:
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
        expected = _shape(contents.student_raw[name])
        for key, value in entry.items():
            shape = _shape(value)
            if shape is not None and not (
                math.prod(shape) <= 1 if key == "step" else shape == expected
            ):
                raise OfficialCheckpointError(
                    f"{path}: optimizer state {key!r:.40} of {name} has shape {shape}, the "
                    f"parameter {expected}"
                )
        out[index] = (name, entry)
    return out


def _file_architecture(contents: _Contents) -> AnyArchitecture | None:
    try:
        return architecture.from_state_shapes({n: _shape(v) for n, v in contents.teacher.items()})
    except ValueError:
        return None


def _heads_problem(
    contents: _Contents, arch: AnyArchitecture, file_arch: AnyArchitecture | None, m: Any
) -> list[str]:
    """A ViT's number of heads is not in the shapes; the file's args.arch may still tell it."""
    if not (isinstance(arch, Architecture) and isinstance(file_arch, Architecture)):
        return []  # an XCiT's heads are in its shapes; a ResNet has none
    trained = getattr(contents.args, "arch", None)
    spec = ARCHS.get(trained, {}) if isinstance(trained, str) else {}
    if spec.get("embed_dim") != file_arch.embed_dim:
        return []
    heads = ARCHS[m.arch]["num_heads"] if m.arch in ARCHS else m.num_heads
    if heads == spec["num_heads"]:
        return []
    return [
        f"the file was trained as {trained} with {spec['num_heads']} attention heads, the config "
        f"has {heads}: set --config.model.num_heads={spec['num_heads']}"
    ]


def _configured(key: str, model_config: Any, ours: Mapping[str, Any]) -> Any:
    """The configured value of a dotted setting: config.model's own, else the architecture's
    (the crop size, which is not in config.model)."""
    section, _, leaf = key.partition(".")
    value = getattr(model_config, leaf, None) if section == "model" else ours.get(key)
    return tuple(value) if isinstance(value, list) else value


def _mismatch_message(
    path: str,
    problems: list[str],
    wanted: AnyArchitecture,
    found: AnyArchitecture | None,
    model_config: Any,
) -> str:
    shown = "\n  - ".join(problems[:_SHOWN])
    more = f"\n  - ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    text = (
        f"{path} does not fit the configured model, {architecture.describe(wanted)}:\n"
        f"  - {shown}{more}\n"
    )
    if found is None:
        return text + "Give an official DINO checkpoint of the configured model."
    ours, theirs = architecture.settings_for(wanted), architecture.settings_for(found)
    changes = [
        f"--config.{k}={flag_value(v)}"
        for k, v in theirs.items()
        if _configured(k, model_config, ours) != v
    ]
    text += f"The file holds {architecture.describe(found)}."
    if changes:
        return (
            text + " To start from it, set " + " ".join(changes) + "; or give a checkpoint "
            "of the configured model."
        )
    return text + " Not all of its tensors fit that: give a complete, unedited checkpoint."


def _target_architecture(
    contents: _Contents, path: str, model_config: Any, img_size: int | None
) -> AnyArchitecture:
    """The architecture the file must have: the configured model's (its position grid taken
    from the file when no crop size is given), or the one the file's own tensors declare."""
    teacher = {name: _shape(value) for name, value in contents.teacher.items()}
    if model_config is None:
        try:
            return architecture.from_state_shapes(teacher)
        except ValueError as err:
            raise OfficialCheckpointError(f"{path}: {err}") from None
    try:
        arch = architecture.from_model_config(model_config, img_size)
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise OfficialCheckpointError(
            f"{path}: cannot check it against the model config ({err})"
        ) from None
    if not any(name.startswith("head.") for name in teacher):
        arch = dataclasses.replace(arch, head=None)  # backbone weights: the head starts fresh
    if isinstance(arch, Architecture) and arch.grid is None:
        grid = architecture.pos_grid(teacher.get("backbone.pos_embed"), arch.embed_dim)
        arch = dataclasses.replace(arch, grid=grid)
    return arch


def _network_problems(arch: AnyArchitecture, state: Mapping[str, Any], what: str) -> list[str]:
    found = {name: _shape(value) for name, value in state.items()}
    lines = []
    # a configured ViT takes any square grid, and the file has none
    if isinstance(arch, Architecture) and arch.grid is None:
        shape = found.pop("backbone.pos_embed", None)
        lines.append(
            f"backbone.pos_embed has shape {shape}, not (1, 1 + g*g, {arch.embed_dim}) for a "
            f"square grid of side g <= {architecture.MAX_POS_GRID}"
        )
    lines += architecture.differences(architecture.state_shapes(arch), found)
    lines += [
        f"{name} holds {value.dtype}, not floating point"
        for name, value in state.items()
        if not name.endswith("num_batches_tracked") and np.dtype(value.dtype) not in FLOAT_DTYPES
    ]
    lines += [
        f"{name} holds {value.dtype}, not an integer count"
        for name, value in state.items()
        if name.endswith("num_batches_tracked") and not np.issubdtype(value.dtype, np.integer)
    ]
    return [f"{what}: {line}" for line in lines]


_ARTICLE = {"ViT": "a ViT", "ResNet": "a ResNet", "XCiT": "an XCiT"}


def _family_problem(arch: AnyArchitecture, file_arch: AnyArchitecture | None) -> list[str]:
    if file_arch is None or type(file_arch) is type(arch):
        return []
    ours, theirs = (_ARTICLE[architecture.backbone_family(a)] for a in (arch, file_arch))
    return [f"the file holds {theirs} backbone, the configured model is {ours}"]


def _check_shapes(
    contents: _Contents, path: str, model_config: Any, img_size: int | None
) -> AnyArchitecture:
    """Raise OfficialCheckpointError unless every network entry has the architecture's shape
    and a floating-point type; returns that architecture."""
    arch = _target_architecture(contents, path, model_config, img_size)
    file_arch = _file_architecture(contents)
    problems = _network_problems(arch, contents.teacher, "teacher")
    if contents.student is not None:
        problems += _network_problems(arch, contents.student, "student")
    if family := _family_problem(arch, file_arch):  # tensor by tensor would say little more
        problems = [*family, f"{len(problems)} state-dict entries differ from the model's"]
    if model_config is not None:
        problems += _heads_problem(contents, arch, file_arch, model_config)
    out_dim = arch.head.out_dim if arch.head is not None else None
    if out_dim is None and model_config is not None:
        out_dim = model_config.out_dim  # a backbone file: the center must fit the fresh head
    center = _shape(contents.center)
    if center is not None and out_dim is not None and center != (1, out_dim):
        problems.append(f"dino_loss.center has shape {center}, expected (1, {out_dim})")
    if problems and model_config is not None:
        raise OfficialCheckpointError(
            _mismatch_message(path, problems, arch, file_arch, model_config)
        )
    if problems:
        raise OfficialCheckpointError(
            f"{path}: its tensors do not form one DINO network ({architecture.describe(arch)}):"
            + "".join(f"\n  - {line}" for line in problems[:_SHOWN])
        )
    return arch


def _used_tensors(contents: _Contents, networks: Collection[str], adam: dict | None) -> list:
    tensors = [*contents.teacher.values()] if "teacher" in networks else []
    tensors += [*(contents.student or {}).values()] if "student" in networks else []
    tensors += [contents.center] if contents.center is not None else []
    for _, entry in (adam or {}).values():
        tensors += [v for v in entry.values() if _shape(v) is not None]
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


def _plan(
    path: str, model_config: Any, img_size: int | None, networks: Collection[str], optimizer: bool
) -> tuple[PthFile, set[str]]:
    """The checked file and the storages to read, from the pickle alone."""
    pth = open_pth(path)
    contents = _contents(pth.tree, path)
    _check_shapes(contents, path, model_config, img_size)
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
        {}, epoch=contents.epoch, args=contents.args, architecture=_file_architecture(contents)
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

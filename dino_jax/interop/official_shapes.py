"""The shapes an official file must have to start or fill the configured model: the file's
own architecture read off its tensors, the configured one, and the message that names what
differs and the settings that would fit. Shapes only: checked from the pickle, before any
tensor is read (dino_jax.interop.official reads them afterwards)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from dino_jax.interop import architecture
from dino_jax.interop.architecture import AnyArchitecture, Architecture
from dino_jax.interop.architecture_common import flag_value
from dino_jax.interop.pth import Namespace, PthError, TensorInfo
from dino_jax.models.vit import ARCHS

# Weights and BatchNorm statistics are floating point; an int or bool "weight" is damage.
FLOAT_DTYPES = frozenset(
    np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)
)
_SHOWN = 6  # differences listed in a message


class OfficialCheckpointError(PthError):
    """The file is not an official DINO checkpoint this code can use (or not one of the
    configured model); the message names the file, what is wrong and what to do."""


@dataclasses.dataclass
class FileContents:
    """The parts of an official file, checked for type (tensors may be TensorInfo)."""

    teacher: dict[str, Any]  # normalised names: backbone.* / head.*
    student: dict[str, Any] | None
    student_raw: Mapping[str, Any] | None  # as saved (the optimiser is keyed by these names)
    center: Any
    epoch: int | None
    args: Namespace | None
    optimizer: Mapping[str, Any] | None


def tensor_shape(value: Any) -> tuple[int, ...] | None:
    """The shape of a tensor (read or not), None for anything else."""
    if isinstance(value, TensorInfo | np.ndarray):
        return tuple(value.shape)
    return None


def file_architecture(contents: FileContents) -> AnyArchitecture | None:
    try:
        return architecture.from_state_shapes(
            {n: tensor_shape(v) for n, v in contents.teacher.items()}
        )
    except ValueError:
        return None


def _heads_problem(
    contents: FileContents, arch: AnyArchitecture, file_arch: AnyArchitecture | None, m: Any
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
    contents: FileContents, path: str, model_config: Any, img_size: int | None
) -> AnyArchitecture:
    """The architecture the file must have: the configured model's (its position grid taken
    from the file when no crop size is given), or the one the file's own tensors declare."""
    teacher = {name: tensor_shape(value) for name, value in contents.teacher.items()}
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
    found = {name: tensor_shape(value) for name, value in state.items()}
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


def check_shapes(
    contents: FileContents, path: str, model_config: Any, img_size: int | None
) -> AnyArchitecture:
    """Raise OfficialCheckpointError unless every network entry has the architecture's shape
    and a floating-point type; returns that architecture."""
    arch = _target_architecture(contents, path, model_config, img_size)
    file_arch = file_architecture(contents)
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
    center = tensor_shape(contents.center)
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

"""Our param and batch_stats trees as official DINO files: a full `checkpoint.pth` that
main_dino.py resumes from and a backbone `*_pretrain.pth` like the released ones."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from dino_jax.interop import architecture
from dino_jax.interop.pth import Namespace, save_pth
from dino_jax.interop.state_dict import BN_BUFFERS, official_order, to_state_dict

# PyTorch's initial BatchNorm buffers, for a DINOHead BatchNorm given without statistics.
_INITIAL_BUFFERS = {
    "running_mean": lambda dim: np.zeros(dim, np.float32),
    "running_var": lambda dim: np.ones(dim, np.float32),
    "num_batches_tracked": lambda dim: np.zeros((), np.int64),
}


def _fill_head_buffers(state: dict[str, np.ndarray]) -> None:
    """A head BatchNorm (a 1-D `head.mlp.<i>.weight`) without statistics gets PyTorch's
    initial ones: DINO's head always runs on batch statistics (train mode), so its running
    statistics are never used, and the official loader wants them present."""
    for name in [n for n in state if n.startswith("head.mlp.") and n.endswith(".weight")]:
        if state[name].ndim == 1:
            module = name[: -len("weight")]
            for buf, initial in _INITIAL_BUFFERS.items():
                state.setdefault(module + buf, initial(state[name].shape[0]))


def _check_backbone_buffers(state: Mapping[str, np.ndarray]) -> None:
    """A backbone's BatchNorm statistics are part of its weights (evaluation normalises with
    them): refuse to write a ResNet or XCiT without them rather than invent any."""
    try:
        arch = architecture.from_state_shapes({n: v.shape for n, v in state.items()})
    except ValueError:
        return  # not a whole network (a part of one): nothing to compare with
    missing = [
        name
        for name in architecture.state_shapes(arch)
        if name.rsplit(".", 1)[-1] in BN_BUFFERS and name not in state
    ]
    if missing:
        raise ValueError(
            f"the {architecture.backbone_family(arch)} has BatchNorm layers but no running "
            f"statistics were given ({len(missing)} buffers, e.g. {missing[0]}): pass the "
            "network's batch_stats with its params"
        )


def official_state_dict(
    params: Mapping[str, Any],
    prefix: str = "",
    batch_stats: Mapping[str, Any] | None = None,
) -> OrderedDict:
    """Our {'backbone', 'head'} params and batch_stats (the Flax collection of the same
    network; None or {} without BatchNorm) as an official state dict: names, layouts and
    PyTorch's order, each name with `prefix`. ValueError for a ResNet / XCiT backbone given
    without its batch_stats."""
    state = to_state_dict(params, batch_stats=batch_stats)
    _fill_head_buffers(state)
    _check_backbone_buffers(state)
    return OrderedDict((prefix + n, state[n]) for n in official_order(state))


def has_batch_norm(state: Mapping[str, Any]) -> bool:
    """utils.has_batchnorms for a state dict: any BatchNorm buffer."""
    return any(name.endswith(".running_mean") for name in state)


def save_official_checkpoint(
    path: str | os.PathLike[str],
    *,
    student: dict[str, Any],
    teacher: dict[str, Any],
    center: np.ndarray,
    epoch: int,
    args: Namespace | None = None,
    student_stats: Mapping[str, Any] | None = None,
    teacher_stats: Mapping[str, Any] | None = None,
) -> None:
    """Write a full checkpoint the official main_dino.py / eval scripts can load.

    `*_stats` are the batch_stats of each network ({'backbone': ..., 'head': ...}; each
    network keeps its own). As main_dino.py saves them, the student's names carry the
    `module.` of its DistributedDataParallel wrapper, and so do the teacher's when the
    network has BatchNorm (the official code wraps the teacher in DDP only then).
    """
    teacher_state = official_state_dict(teacher, "", teacher_stats)
    if has_batch_norm(teacher_state):
        teacher_state = OrderedDict(("module." + k, v) for k, v in teacher_state.items())
    checkpoint = {
        "student": official_state_dict(student, "module.", student_stats),
        "teacher": teacher_state,
        "epoch": int(epoch),
        "dino_loss": OrderedDict(center=np.asarray(center, np.float32).reshape(1, -1)),
    }
    if args is not None:
        checkpoint["args"] = args
    save_pth(checkpoint, path)


def save_official_backbone(
    path: str | os.PathLike[str],
    teacher: dict[str, Any],
    teacher_stats: Mapping[str, Any] | None = None,
) -> None:
    """Write the teacher backbone (with its BatchNorm statistics from `teacher_stats`, the
    teacher's batch_stats) like the released *_pretrain.pth files: no prefixes."""
    stats = {"backbone": teacher_stats["backbone"]} if "backbone" in (teacher_stats or {}) else None
    state = official_state_dict({"backbone": teacher["backbone"]}, batch_stats=stats)
    save_pth(OrderedDict((k.removeprefix("backbone."), v) for k, v in state.items()), path)

"""Official DINO checkpoints in and out: full `checkpoint.pth` and backbone `*_pretrain.pth`.

Reading goes through `pth.load_pth` (no PyTorch, no code from the file). Architecture
sizes are read off the tensor shapes; only the number of heads is not in the shapes: it
comes from an argument, the checkpoint's `args.arch`, or the official size for the width.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from dino_jax.interop.pth import Namespace, load_pth, save_pth
from dino_jax.interop.state_dict import BN_BUFFERS, from_state_dict, to_state_dict
from dino_jax.models.vit import ARCHS

HEADS_BY_WIDTH = {spec["embed_dim"]: spec["num_heads"] for spec in ARCHS.values()}


@dataclasses.dataclass
class OfficialCheckpoint:
    """What an official file holds, as our param trees ({'backbone': ..., 'head': ...})."""

    teacher: dict[str, Any]  # the network to evaluate; a backbone-only file fills 'backbone'
    student: dict[str, Any] | None = None
    center: np.ndarray | None = None  # (1, K)
    epoch: int | None = None
    args: Namespace | None = None
    adam: dict[str, dict[str, np.ndarray]] | None = None  # student name -> step/exp_avg/...
    buffers: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _network(state: dict[str, Any], what: str, path: str) -> tuple[dict, dict]:
    """Params {'backbone', 'head'?} from a state dict with or without DDP/wrapper prefixes."""
    state = {name.removeprefix("module."): value for name, value in state.items()}
    if not any(k.startswith("backbone.") for k in state):
        if "cls_token" not in state:
            raise ValueError(
                f"{path}: the {what} state dict has no ViT backbone (no 'cls_token' or "
                "'backbone.cls_token' entry); is this a DINO ViT checkpoint?"
            )
        state = {"backbone." + k: v for k, v in state.items()}
    params, buffers = from_state_dict(state)
    unknown = sorted(set(params) - {"backbone", "head"})
    if unknown:
        raise ValueError(f"{path}: unexpected top-level entries {unknown} in the {what}")
    return params, buffers


def load_official(path: str | os.PathLike[str]) -> OfficialCheckpoint:
    """Read an official full checkpoint or a backbone-only state dict into param trees."""
    path = os.fspath(path)
    raw = load_pth(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(raw).__name__}")
    if "teacher" in raw:
        teacher, buffers = _network(raw["teacher"], "teacher", path)
        student = None
        if "student" in raw:
            student, _ = _network(raw["student"], "student", path)
        center = raw.get("dino_loss", {}).get("center")
        ckpt = OfficialCheckpoint(
            teacher=teacher,
            student=student,
            center=None if center is None else np.asarray(center, np.float32),
            epoch=raw.get("epoch"),
            args=raw.get("args"),
            buffers=buffers,
        )
        if "optimizer" in raw and "student" in raw:
            norm_last_layer = getattr(ckpt.args, "norm_last_layer", True)
            ckpt.adam = _adam_by_name(raw["optimizer"], raw["student"], norm_last_layer)
        return ckpt
    # backbone-only files (released *_pretrain.pth), possibly under a single wrapper key
    state = raw.get("state_dict", raw.get("model", raw))
    teacher, buffers = _network(state, "backbone", path)
    return OfficialCheckpoint(teacher=teacher, buffers=buffers)


def _adam_by_name(optimizer: dict, student_state: dict, norm_last_layer: bool) -> dict:
    """AdamW state keyed by student parameter name.

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
    decayed = [n for n in names if not n.endswith(".bias") and np.ndim(student_state[n]) > 1]
    others = [n for n in names if n not in set(decayed)]
    ordered = decayed + others
    state = optimizer.get("state", {})
    if state and max(state) >= len(ordered):
        raise ValueError("optimizer state does not match the student's parameters")
    return {ordered[i]: {k: np.asarray(v) for k, v in s.items()} for i, s in state.items()}


def infer_backbone(backbone: dict[str, Any], num_heads: int | None = None, args=None) -> dict:
    """VisionTransformer keyword arguments read off a backbone param tree."""
    dim = int(np.shape(backbone["cls_token"])[-1])
    depth = sum(1 for k in backbone if k.startswith("blocks_"))
    patch = int(np.shape(backbone["patch_embed"]["proj"]["kernel"])[0])
    n_pos = int(np.shape(backbone["pos_embed"])[1]) - 1
    grid = round(n_pos**0.5)
    hidden = int(np.shape(backbone["blocks_0"]["mlp"]["fc1"]["kernel"])[1])
    if num_heads is None:
        arch = ARCHS.get(getattr(args, "arch", None) or "", {})
        if arch.get("embed_dim") == dim:
            num_heads = arch["num_heads"]
        elif dim in HEADS_BY_WIDTH:
            num_heads = HEADS_BY_WIDTH[dim]
        else:
            raise ValueError(
                f"cannot tell the number of attention heads of a ViT of width {dim} from its "
                "weights; pass num_heads explicitly"
            )
    return {
        "patch_size": patch,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": hidden / dim,
        "qkv_bias": "bias" in backbone["blocks_0"]["attn"]["qkv"],
        "img_size": grid * patch,
    }


def infer_head(head: dict[str, Any]) -> dict:
    """DINOHead keyword arguments read off a head param tree."""
    v = np.shape(head["last_layer"]["weight_v"])
    if "mlp" in head:
        return {"nlayers": 1, "bottleneck_dim": v[0], "out_dim": v[1], "use_bn": False}
    indices = sorted(int(k.split("_")[1]) for k in head if k.startswith("mlp_"))
    linears = [i for i in indices if "kernel" in head[f"mlp_{i}"]]
    return {
        "nlayers": len(linears),
        "hidden_dim": int(np.shape(head[f"mlp_{linears[0]}"]["kernel"])[1]),
        "bottleneck_dim": v[0],
        "out_dim": v[1],
        "use_bn": len(indices) > len(linears),
    }


# One order consistent with the registration order inside every official module
# (VisionTransformer, Block, Attention, Mlp, DINOHead, BatchNorm1d).
_MODULE_ORDER = (
    "backbone", "head", "cls_token", "pos_embed", "patch_embed", "blocks", "norm1", "attn",
    "qkv", "proj", "norm2", "mlp", "fc1", "fc2", "norm", "last_layer",
    "weight", "weight_g", "weight_v", "bias", *BN_BUFFERS,
)  # fmt: skip


def _official_rank(name: str) -> tuple:
    """Sort key giving PyTorch's state-dict order (registration order of the modules)."""
    rank = []
    for part in name.split("."):
        if part.isdigit():
            rank.append((int(part), ""))
        else:
            known = part in _MODULE_ORDER
            rank.append((_MODULE_ORDER.index(part) if known else len(_MODULE_ORDER), part))
    return tuple(rank)


def official_state_dict(
    params: dict[str, Any], prefix: str = "", buffers: dict[str, np.ndarray] | None = None
) -> OrderedDict:
    """Our {'backbone', 'head'} params as an official state dict (names, layouts, order).

    BatchNorm layers of the head get their running statistics from `buffers` (as imported)
    or PyTorch's initial values; DINO never uses them (both networks run in train mode).
    """
    state = to_state_dict(params)
    for name in [n for n in state if n.startswith("head.mlp.") and n.endswith(".weight")]:
        if state[name].ndim == 1:  # a BatchNorm scale
            module = name[: -len("weight")]
            dim = state[name].shape[0]
            defaults = {
                "running_mean": np.zeros(dim, np.float32),
                "running_var": np.ones(dim, np.float32),
                "num_batches_tracked": np.zeros((), np.int64),
            }
            for buf, value in defaults.items():
                key = (module + buf).removeprefix("head.")
                state[module + buf] = np.asarray((buffers or {}).get(key, value))
    return OrderedDict((prefix + n, state[n]) for n in sorted(state, key=_official_rank))


def save_official_checkpoint(
    path: str | os.PathLike[str],
    *,
    student: dict[str, Any],
    teacher: dict[str, Any],
    center: np.ndarray,
    epoch: int,
    args: Namespace | None = None,
    buffers: dict[str, np.ndarray] | None = None,
) -> None:
    """Write a full checkpoint the official main_dino.py / eval scripts can load."""
    checkpoint = {
        "student": official_state_dict(student, "module.", buffers),
        "teacher": official_state_dict(teacher, "", buffers),
        "epoch": int(epoch),
        "dino_loss": OrderedDict(center=np.asarray(center, np.float32).reshape(1, -1)),
    }
    if args is not None:
        checkpoint["args"] = args
    save_pth(checkpoint, path)


def save_official_backbone(path: str | os.PathLike[str], teacher: dict[str, Any]) -> None:
    """Write the teacher backbone like the released *_pretrain.pth files (no prefixes)."""
    state = official_state_dict({"backbone": teacher["backbone"]})
    save_pth(OrderedDict((k.removeprefix("backbone."), v) for k, v in state.items()), path)


def load_backbone(
    path: str | os.PathLike[str], *, num_heads: int | None = None, which: str = "teacher", **kw
):
    """(VisionTransformer, variables) ready for `model.apply(variables, images)`.

    `which` picks the teacher (the network the official evaluations use) or the student of a
    full checkpoint; `kw` overrides module fields (dtype, attention_impl, ...).
    """
    from dino_jax.models.vit import VisionTransformer

    ckpt = load_official(path)
    params = ckpt.teacher if which == "teacher" else ckpt.student
    if params is None:
        raise ValueError(f"{os.fspath(path)} holds no {which} network")
    arch = infer_backbone(params["backbone"], num_heads, ckpt.args)
    return VisionTransformer(**{**arch, **kw}), {"params": params["backbone"]}

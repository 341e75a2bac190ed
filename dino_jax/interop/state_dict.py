"""Official PyTorch state-dict names and layouts <-> our Flax param and batch_stats pytrees.

The modules name their params after the official ones, so the mapping is mechanical:
`blocks.0.attn.qkv.weight` [out, in] <-> params `blocks_0/attn/qkv/kernel` [in, out];
`layer1.0.downsample.1.running_mean` <-> batch_stats `layer1_0/downsample_1/mean`; a doubly
indexed name such as XCiT's `patch_embed.proj.0.0.weight` <-> `patch_embed/proj_0_0/kernel`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# BatchNorm buffers (not parameters: no gradient, no optimiser state, no teacher EMA) and
# their names in the Flax `batch_stats` collection of dino_jax.models.batchnorm.BatchNorm.
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_STAT_OF_BUFFER = {"running_mean": "mean", "running_var": "var", "num_batches_tracked": "count"}
_BUFFER_OF_STAT = {stat: buf for buf, stat in _STAT_OF_BUFFER.items()}
_COUNT_RANGE = (0, np.iinfo(np.int32).max)

_INDEXED = re.compile(r"^(.*)_(\d+)$")

# One order consistent with the registration order inside every official module, which is
# PyTorch's state-dict order (a module's own parameters, then its children in the order they
# were assigned): VisionTransformer / Block / Attention / Mlp (vision_transformer.py),
# DINOHead, torchvision's ResNet / Bottleneck, and xcit.py's XCiT / ConvPatchEmbed / XCABlock
# / XCA / LPI / ClassAttentionBlock / PositionalEncodingFourier; BatchNorm's buffers last.
_MODULE_ORDER = (
    "backbone", "head",
    "cls_token", "pos_embed", "gamma1", "gamma2", "gamma3", "temperature",
    "patch_embed", "conv1", "bn1", "bn", "conv2", "bn2", "conv3", "bn3", "downsample",
    "layer1", "layer2", "layer3", "layer4",
    "blocks", "cls_attn_blocks", "norm1", "attn", "qkv", "proj", "norm2", "mlp", "fc1", "fc2",
    "norm3", "local_mp", "norm", "last_layer", "pos_embeder", "token_projection",
    "weight", "weight_g", "weight_v", "bias", *BN_BUFFERS,
)  # fmt: skip


def official_rank(name: str) -> tuple:
    """Sort key giving PyTorch's state-dict order of official names (with any prefix)."""
    rank = []
    for part in name.split("."):
        if part.isdigit():
            rank.append((int(part), ""))
        else:
            known = part in _MODULE_ORDER
            rank.append((_MODULE_ORDER.index(part) if known else len(_MODULE_ORDER), part))
    return tuple(rank)


def official_order(names: Iterable[str]) -> list[str]:
    return sorted(names, key=official_rank)


def _to_flax_layout(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    # Conv2d OIHW -> HWIO; a depthwise conv's [C, 1, k, k] becomes (k, k, 1, C), the kernel
    # of nn.Conv(feature_group_count=C).
    if leaf == "weight" and value.ndim == 4:
        return "kernel", value.transpose(2, 3, 1, 0)
    if leaf == "weight" and value.ndim == 2:  # Linear [out, in] -> Dense [in, out]
        return "kernel", value.T
    if leaf == "weight" and value.ndim == 1:  # LayerNorm / BatchNorm
        return "scale", value
    if leaf in ("weight_v", "weight_g"):  # weight norm, [K, in] / [K, 1] -> [in, K] / [1, K]
        return leaf, value.T
    return leaf, value  # biases, cls_token, pos_embed, XCiT's temperature [h, 1, 1], gammas


def _to_torch_layout(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if leaf == "kernel" and value.ndim == 4:
        return "weight", value.transpose(3, 2, 0, 1)
    if leaf == "kernel":
        return "weight", value.T
    if leaf == "scale":
        return "weight", value
    if leaf in ("weight_v", "weight_g"):
        return leaf, value.T
    return leaf, value


def _count(name: str, value: np.ndarray) -> np.ndarray:
    """num_batches_tracked (int64 in PyTorch) as the int32 `count` of our BatchNorm."""
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"{name} is a {value.dtype} of shape {value.shape}, not an integer count")
    if not _COUNT_RANGE[0] <= int(value) <= _COUNT_RANGE[1]:
        raise ValueError(f"{name} = {int(value)} is not a batch count (0 to 2**31 - 1)")
    return value.astype(np.int32)


def _flax_path(parts: list[str]) -> list[str]:
    path: list[str] = []
    for part in parts:
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"  # nn.Sequential / ModuleList index
        else:
            path.append(part)
    return path


def from_state_dict(
    state_dict: Mapping[str, Any], prefix: str = ""
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, batch_stats): nested Flax trees of the entries under `prefix` (removed).

    BatchNorm buffers go to `batch_stats` at the path of their layer: `running_mean` ->
    `mean`, `running_var` -> `var`, `num_batches_tracked` -> `count` (int32). A network
    without BatchNorm gives batch_stats == {}.
    """
    trees: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
    for name, value in state_dict.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix) :]
        value = np.asarray(value)
        parts = name.split(".")
        path = _flax_path(parts[:-1])
        if parts[-1] in BN_BUFFERS:
            collection, leaf = "batch_stats", _STAT_OF_BUFFER[parts[-1]]
            if leaf == "count":
                value = _count(name, value)
        else:
            collection = "params"
            leaf, value = _to_flax_layout(parts[-1], value)
        node = trees[collection]
        for key in path:
            node = node.setdefault(key, {})
        if leaf in node:
            raise ValueError(f"two state-dict entries map onto {'/'.join([*path, leaf])}")
        node[leaf] = value
    return trees["params"], trees["batch_stats"]


def _official_names(node: Mapping[str, Any], path: list[str], convert, out: dict) -> None:
    for key, value in node.items():
        if isinstance(value, Mapping):
            parts = []
            while match := _INDEXED.match(key):  # proj_0_0 -> proj.0.0
                key, index = match.groups()
                parts.insert(0, index)
            _official_names(value, [*path, key, *parts], convert, out)
        else:
            leaf, array = convert(key, np.asarray(value))
            name = ".".join([*path, leaf])
            if name in out:
                raise ValueError(f"two tree entries map onto the state-dict name {name}")
            out[name] = array.copy(order="C")


def _stat_to_buffer(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if key not in _BUFFER_OF_STAT:
        raise ValueError(f"batch_stats leaf {key!r} is not one of {sorted(_BUFFER_OF_STAT)}")
    return _BUFFER_OF_STAT[key], value.astype(np.int64) if key == "count" else value


def to_state_dict(
    params: Mapping[str, Any],
    prefix: str = "",
    batch_stats: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Official names and layouts for (nested) Flax params and batch_stats, in PyTorch's
    state-dict order, each name with `prefix`; `count` is written as int64, torch's dtype."""
    out: dict[str, np.ndarray] = {}
    _official_names(params, [], _to_torch_layout, out)
    _official_names(batch_stats or {}, [], _stat_to_buffer, out)
    return {prefix + name: out[name] for name in official_order(out)}

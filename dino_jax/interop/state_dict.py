"""Official PyTorch state-dict names and layouts <-> our Flax param pytrees.

The modules name their params after the official ones, so the mapping is mechanical:
`blocks.0.attn.qkv.weight` [out, in] <-> `blocks_0/attn/qkv/kernel` [in, out].
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# Running statistics of BatchNorm1d: PyTorch buffers with no counterpart in our params (both
# DINO networks normalise with batch statistics), kept aside by `from_state_dict`.
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

_INDEXED = re.compile(r"^(.*)_(\d+)$")


def _to_flax_layout(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if leaf == "weight" and value.ndim == 4:  # Conv2d OIHW -> HWIO
        return "kernel", value.transpose(2, 3, 1, 0)
    if leaf == "weight" and value.ndim == 2:  # Linear [out, in] -> Dense [in, out]
        return "kernel", value.T
    if leaf == "weight" and value.ndim == 1:  # LayerNorm / BatchNorm
        return "scale", value
    if leaf in ("weight_v", "weight_g"):  # weight norm, [K, in] / [K, 1] -> [in, K] / [1, K]
        return leaf, value.T
    return leaf, value


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


def from_state_dict(
    state_dict: Mapping[str, Any], prefix: str = ""
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Nested Flax params from the entries of `state_dict` under `prefix` (prefix removed).

    Returns (params, buffers): BatchNorm running statistics go to `buffers` under their
    official names, since our batch-statistics norm has no state.
    """
    params: dict[str, Any] = {}
    buffers: dict[str, np.ndarray] = {}
    for name, value in state_dict.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix) :]
        value = np.asarray(value)
        parts = name.split(".")
        if parts[-1] in BN_BUFFERS:
            buffers[name] = value
            continue
        path: list[str] = []
        for part in parts[:-1]:
            if part.isdigit() and path:
                path[-1] = f"{path[-1]}_{part}"  # nn.Sequential / ModuleList index
            else:
                path.append(part)
        leaf, value = _to_flax_layout(parts[-1], value)
        node = params
        for key in path:
            node = node.setdefault(key, {})
        if leaf in node:
            raise ValueError(f"two state-dict entries map onto {'/'.join([*path, leaf])}")
        node[leaf] = value
    return params, buffers


def to_state_dict(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Official names and layouts for a (nested) Flax param tree, each name with `prefix`."""
    out: dict[str, np.ndarray] = {}

    def visit(node: Mapping[str, Any], path: list[str]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                match = _INDEXED.match(key)
                visit(value, [*path, *(match.groups() if match else (key,))])
            else:
                leaf, array = _to_torch_layout(key, np.asarray(value))
                out[prefix + ".".join([*path, leaf])] = array.copy(order="C")

    visit(params, [])
    return out

"""DINO's ViT in the layout of Hugging Face transformers' `ViTModel`, the one of the
`facebook/dino-vits16`, `-vits8`, `-vitb16` and `-vitb8` models: a directory with `config.json`
(ViTConfig fields) and `model.safetensors`, written and read without PyTorch or transformers.

The names are those transformers writes (`save_pretrained`; version 5 renames its modules in
memory and maps these names onto them when loading): the official DINO
`blocks.{i}.norm1` is `encoder.layer.{i}.layernorm_before`, `attn.proj` is
`attention.output.dense`, `mlp.fc1` / `mlp.fc2` are `intermediate.dense` / `output.dense`,
`norm2` is `layernorm_after`, the final `norm` is `layernorm`, and the fused `attn.qkv` is split
into `attention.attention.query` / `key` / `value` (its output features are ordered q, k, v).
Weights are PyTorch's [out, in] Linear and OIHW Conv2d layouts (state_dict.py's). ViTModel's
pooler (a tanh Linear on the CLS token) has no counterpart in DINO and is not written: load
with `ViTModel.from_pretrained(directory, add_pooling_layer=False)`, as transformers' own DINO
conversion (convert_dino_to_pytorch.py) builds the model; without it transformers initialises
a random pooler and says so. `last_hidden_state[:, 0]` is the DINO feature (final-norm CLS).

HF's `interpolate_pos_encoding=True` resizes the position embedding to the new grid by size,
where the official DINO code (and our ViT) resizes by scale factor (n + 0.1) / g: at the
stored image size both are the stored embedding, at other sizes they differ slightly.

This module holds the tensors: their names, layouts and files, and `save_hf` / `load_hf`. The
config.json side (`hf_config`, the checks of a ViTConfig) and HFModelError are in
dino_jax.interop.hf_vit_config, and importable from here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dino_jax.interop.hf_vit_config import (
    CONFIG,
    HFModelError,
    _read_config,
    _refuse_other_models,
    _vit_fields,
    hf_config,
)
from dino_jax.interop.official_export import official_state_dict
from dino_jax.interop.official_shapes import FLOAT_DTYPES
from dino_jax.interop.pth import PthError, TensorInfo, open_pth
from dino_jax.interop.safetensors_io import BACKBONE_FAMILIES, problem_text, variable_problems
from dino_jax.interop.state_dict import from_state_dict
from dino_jax.models import MultiCropNetwork
from dino_jax.models.vit import VisionTransformer

__all__ = ["HFModelError", "hf_config", "hf_state_dict", "load_hf", "save_hf"]

WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"
SHARDED = "model.safetensors.index.json"

# Official DINO module (inside a block / at the top) -> transformers' ViTModel module.
_BLOCK_MODULES = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_QKV = ("query", "key", "value")
# transformers 5's module names inside a layer (what a state_dict() of its ViTModel holds)
_V5_MODULES = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_V5_NAME = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_POOLER = ("pooler.dense.weight", "pooler.dense.bias")
_SHOWN = 6


def _name_pairs(depth: int) -> list[tuple[str, str]]:
    """(official DINO name, transformers name) of every entry but the fused qkv ones."""
    pairs = list(_TOP.items())
    for i in range(depth):
        for ours, theirs in _BLOCK_MODULES.items():
            pairs += [
                (f"blocks.{i}.{ours}.{leaf}", f"encoder.layer.{i}.{theirs}.{leaf}")
                for leaf in ("weight", "bias")
            ]
    return pairs


def _fused_names(depth: int, qkv_bias: bool) -> list[tuple[str, list[str]]]:
    """(official fused qkv name, its transformers query, key and value names) of each block."""
    leaves = ("weight", "bias") if qkv_bias else ("weight",)
    return [
        (
            f"blocks.{i}.attn.qkv.{leaf}",
            [f"encoder.layer.{i}.attention.attention.{part}.{leaf}" for part in _QKV],
        )
        for i in range(depth)
        for leaf in leaves
    ]


def _vit_of(model: Any, variables: Mapping[str, Any]) -> tuple[VisionTransformer, Mapping]:
    """The DINO ViT backbone and its params, of a backbone or of a MultiCropNetwork."""
    params = variables["params"]
    if isinstance(model, MultiCropNetwork):
        model, params = model.backbone, params["backbone"]
    if type(model) is not VisionTransformer:
        family = BACKBONE_FAMILIES.get(type(model), "not a backbone of ours")
        raise HFModelError(
            f"transformers' ViTModel layout holds DINO's ViT; a {type(model).__name__} "
            f"({family}) has none here: save it with dino_jax.interop.safetensors_io."
            "save_safetensors(..., layout='official')"
        )
    problems = variable_problems(model, {"params": params})
    if problems:
        raise HFModelError(
            f"the params are not those of the VisionTransformer:{problem_text(problems)}"
        )
    return model, params


def hf_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A DINO ViT's params (a VisionTransformer's tree) under transformers' ViTModel names and
    PyTorch layouts, the fused qkv split into query, key and value."""
    state = {
        name.removeprefix("backbone."): value
        for name, value in official_state_dict({"backbone": dict(params)}).items()
    }
    depth = sum(1 for key in params if key.startswith("blocks_"))
    qkv_bias = "bias" in params["blocks_0"]["attn"]["qkv"]
    out = {theirs: state[ours] for ours, theirs in _name_pairs(depth)}
    for fused, names in _fused_names(depth, qkv_bias):
        for name, part in zip(names, np.split(state[fused], 3, axis=0), strict=True):
            out[name] = np.ascontiguousarray(part)
    return out


def save_hf(directory: str | os.PathLike[str], model: Any, variables: Mapping[str, Any]) -> None:
    """Write a DINO ViT (`model` a VisionTransformer, or a MultiCropNetwork whose backbone is
    one: its head is left out) with `variables` ({"params": ...}) as a transformers ViTModel
    directory: config.json and model.safetensors (metadata format "pt", as transformers
    writes). ViTModel.from_pretrained(directory, add_pooling_layer=False) loads it."""
    vit, params = _vit_of(model, variables)
    state = hf_state_dict(params)
    dtypes = {value.dtype for value in state.values()}
    directory = os.path.expanduser(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    config = hf_config(vit, dtypes.pop() if len(dtypes) == 1 else np.float32)
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file(state, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})


# ---- import --------------------------------------------------------------------------------


class _SafetensorsWeights:
    """model.safetensors: names from its header, tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            with safe_open(path, framework="np") as f:
                self.names = list(f.keys())
        except (SafetensorError, OSError) as err:
            raise HFModelError(f"{path}: not a readable .safetensors file ({err})") from None

    def read(self) -> dict[str, np.ndarray]:
        with safe_open(self.path, framework="np") as f:
            return {name: f.get_tensor(name) for name in self.names}


class _TorchWeights:
    """pytorch_model.bin through the safe reader (no torch, no code from the file run): names
    from its pickle, tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._pth = open_pth(path)
        except PthError as err:
            raise HFModelError(str(err)) from None
        tree = self._pth.tree
        if not isinstance(tree, Mapping) or not all(
            isinstance(k, str) and isinstance(v, TensorInfo) for k, v in tree.items()
        ):
            raise HFModelError(f"{path}: not a state dict (names -> tensors)")
        self.names = list(tree)

    def read(self) -> dict[str, np.ndarray]:
        try:
            return dict(self._pth.load())
        except PthError as err:
            raise HFModelError(str(err)) from None


def _open_weights(directory: str) -> _SafetensorsWeights | _TorchWeights:
    """model.safetensors, else pytorch_model.bin, of a model directory."""
    for name, kind in ((WEIGHTS, _SafetensorsWeights), (TORCH_WEIGHTS, _TorchWeights)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return kind(path)
    if os.path.isfile(os.path.join(directory, SHARDED)):
        raise HFModelError(
            f"{directory}: its weights are sharded ({SHARDED}), which this reader does not "
            "read: DINO's ViTs fit one file (save_pretrained(directory, max_shard_size='5GB'))"
        )
    found = sorted(os.listdir(directory))[:_SHOWN]
    raise HFModelError(
        f"{directory}: no {WEIGHTS} or {TORCH_WEIGHTS} (found {found}); tf_model.h5 and "
        "flax_model.msgpack are not read"
    )


def _v4_name(name: str) -> str:
    """transformers' saved name of a name of its version-5 ViTModel state_dict()."""
    match = _V5_NAME.match(name)
    if not match:
        return name
    i, module, leaf = match.groups()
    return f"encoder.layer.{i}.{_V5_MODULES.get(module, module)}.{leaf}"


def _check_names(names: list[str], fields: Mapping[str, Any], path: str) -> None:
    """HFModelError unless `names` (transformers' saved names) are the ViTModel's of `fields`,
    a pooler allowed."""
    if len(set(names)) < len(names):
        raise HFModelError(f"{path}: holds entries under both a saved and a version-5 name")
    if any(name.startswith("vit.") for name in names):
        raise HFModelError(
            f"{path}: its names start with 'vit.' (a ViT with a task head): save the backbone "
            "with transformers (model.vit.save_pretrained(directory)) and load that"
        )
    expected = {theirs for _, theirs in _name_pairs(fields["depth"])}
    fused = _fused_names(fields["depth"], fields["qkv_bias"])
    expected |= {name for _, names in fused for name in names}
    problems = [f"{name} is missing" for name in sorted(expected - set(names))]
    problems += [
        f"{name} is not part of DINO's ViT" for name in sorted(set(names) - expected - set(_POOLER))
    ]
    if problems:
        raise HFModelError(
            f"{path}: its tensors are not those of the ViTModel its config describes:"
            + problem_text(problems)
        )


def _official_state(tensors: Mapping[str, np.ndarray], fields: Mapping, path: str) -> dict:
    """The official DINO backbone state dict of transformers-named tensors, q, k, v fused."""
    bad = [n for n, v in tensors.items() if np.dtype(v.dtype) not in FLOAT_DTYPES]
    if bad:
        raise HFModelError(f"{path}: tensors that are not floating-point: {bad[:_SHOWN]}")
    state = {ours: tensors[theirs] for ours, theirs in _name_pairs(fields["depth"])}
    for ours, names in _fused_names(fields["depth"], fields["qkv_bias"]):
        parts = [tensors[name] for name in names]
        if len({p.shape for p in parts}) != 1:
            shapes = [p.shape for p in parts]
            raise HFModelError(f"{path}: query, key and value have shapes {shapes}")
        state[ours] = np.concatenate(parts, axis=0)
    return state


def load_hf(directory: str | os.PathLike[str], **fields: Any) -> tuple[VisionTransformer, dict]:
    """(VisionTransformer, {"params": ...}) of a transformers ViTModel directory in the layout
    `save_hf` writes (config.json with model.safetensors, or a pytorch_model.bin read with the
    project's safe reader, no PyTorch), such as facebook/dino-vits16's. `fields` override
    module fields (dtype, attention_impl, ...); `param_dtype` is the weights' dtype.

    Refused with HFModelError, naming what was found, before any tensor is read: another
    model type or task head (DINOv2, ViTForImageClassification, ...), config values our ViT
    cannot run (another activation or LayerNorm epsilon, a non-square size); then tensors
    that do not match the config. Dropout settings are ignored (no effect at inference) and
    a pooler, which DINO does not have, is dropped."""
    directory = os.path.expanduser(os.fspath(directory))
    config = _read_config(directory)
    where = os.path.join(directory, CONFIG)
    _refuse_other_models(config, where)
    kwargs = _vit_fields(config, where)
    weights = _open_weights(directory)
    names = [_v4_name(name) for name in weights.names]
    _check_names(names, kwargs, weights.path)
    tensors = {_v4_name(name): value for name, value in weights.read().items()}
    state = _official_state(tensors, kwargs, weights.path)
    params, _ = from_state_dict(state)
    dtypes = {np.dtype(v.dtype).name for v in state.values()}
    if len(dtypes) == 1:
        kwargs["param_dtype"] = getattr(jnp, dtypes.pop())
    model = VisionTransformer(**{**kwargs, **fields})
    problems = variable_problems(model, {"params": params})
    if problems:
        raise HFModelError(
            f"{weights.path}: its tensors do not have the shapes its config describes:"
            + problem_text(problems)
        )
    return model, {"params": params}

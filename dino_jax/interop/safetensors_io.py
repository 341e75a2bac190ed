"""Our weights as `.safetensors` files (the Hugging Face format: a JSON header and raw little-
endian tensors, nothing to execute), written and read with `safetensors.numpy`, without PyTorch.

A file holds the variables of one module, a backbone of any family or a whole network (a
`MultiCropNetwork`: backbone and DINO head), under one of two layouts:

- "flax": our Flax names, collection first (`params/blocks_0/attn/qkv/kernel`,
  `batch_stats/bn1/mean`), our layouts; any backbone family.
- "official": the official state-dict names and layouts of state_dict.py (`blocks.0.attn.qkv.
  weight` [out, in], BatchNorm buffers as `running_mean` / `running_var` /
  `num_batches_tracked`), as the released `*_pretrain.pth` files name a backbone and the
  official MultiCropWrapper a network (`backbone.*`, `head.*`). A torch user reads it with
  `safetensors.torch.load_file` and `load_state_dict` into the official model (DINO's ViT,
  ResNet or XCiT, DINOv2's ViT). DINOv3's ViT has no such layout here.

The header metadata says what the file is: the layout and the module's class and fields
(`dino_jax.model`, JSON), enough to rebuild the exact module. Float32, bfloat16 (ml_dtypes,
which safetensors.numpy reads and writes as BF16) and float16 tensors go through bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors.numpy uses)
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dino_jax.interop.official_export import official_state_dict
from dino_jax.interop.state_dict import from_state_dict
from dino_jax.models import DINOHead, MultiCropNetwork
from dino_jax.models.backbones import (
    DinoVisionTransformer,
    ResNet,
    VisionTransformer,
    VisionTransformer3,
    XCiT,
)

__all__ = [
    "LAYOUTS",
    "SafetensorsFileError",
    "load_safetensors",
    "module_description",
    "module_from_description",
    "problem_text",
    "save_safetensors",
    "variable_problems",
]

LAYOUTS = ("flax", "official")
FORMAT_VERSION = "1"  # of the dino_jax.* metadata below
# The backbone classes by family (backbones.FAMILIES names), and every class a file may name.
BACKBONE_FAMILIES = {
    VisionTransformer: "vit",
    DinoVisionTransformer: "dinov2",
    VisionTransformer3: "dinov3",
    ResNet: "resnet",
    XCiT: "xcit",
}
_CLASSES = {cls.__name__: cls for cls in (*BACKBONE_FAMILIES, DINOHead, MultiCropNetwork)}
_DTYPES = ("float32", "bfloat16", "float16", "float64")  # module dtype fields a file may name
_SHOWN = 6  # problems listed in a message


class SafetensorsFileError(ValueError):
    """A .safetensors file (or what is to be written to one) that is not what is asked for."""


# ---- module <-> JSON description -------------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, nn.Module):
        return module_description(value)
    if isinstance(value, np.dtype | type):
        return {"dtype": jnp.dtype(value).name}
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot describe a module field of type {type(value).__name__}")


def module_description(module: nn.Module) -> dict[str, Any]:
    """{"class": name, "fields": {field: value}}: every dataclass field of a (nested) module,
    dtypes as {"dtype": name}, submodules as their own descriptions; JSON-serialisable."""
    fields = {
        f.name: _encode(getattr(module, f.name))
        for f in dataclasses.fields(module)
        if f.name not in ("parent", "name")
    }
    return {"class": type(module).__name__, "fields": fields}


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"class", "fields"}:
        return module_from_description(value)
    if isinstance(value, dict) and set(value) == {"dtype"}:
        if value["dtype"] not in _DTYPES:
            raise ValueError(f"dtype {value['dtype']!r:.40} is not one of {_DTYPES}")
        return getattr(jnp, value["dtype"])
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"a field value {value!r:.60} is no module field")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def module_from_description(description: Mapping[str, Any]) -> nn.Module:
    """The module of `module_description`. ValueError for a class that is not one of ours or
    a field it does not have."""
    name = description.get("class") if isinstance(description, Mapping) else None
    if name not in _CLASSES:
        raise ValueError(f"module class {name!r:.60} is not one of {sorted(_CLASSES)}")
    stored = description.get("fields")
    if not isinstance(stored, Mapping):
        raise ValueError(f"the {name} description has no fields")
    unknown = sorted(set(stored) - _field_names(_CLASSES[name]))
    if unknown:
        raise ValueError(f"{name} has no field(s) {unknown[:_SHOWN]}")
    return _CLASSES[name](**{k: _decode(v) for k, v in stored.items()})


# ---- checking variables against a module -----------------------------------------------------


def _backbone(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, MultiCropNetwork) else model


def _sample_input(model: nn.Module) -> Any:
    """An input the module takes: a ViT's stored grid (DINO's, DINOv2's), else two patches
    (XCiT, DINOv3) or 32 px (a ResNet's total stride); a network gets one crop group."""
    backbone = _backbone(model)
    side = getattr(backbone, "img_size", None) or 2 * getattr(backbone, "patch_size", 16)
    image = jnp.zeros((1, side, side, 3), jnp.float32)
    return [image[:, None]] if isinstance(model, MultiCropNetwork) else image


def abstract_variables(model: nn.Module) -> dict[str, Any]:
    """The variable shapes and dtypes `model.init` makes (traced, nothing computed)."""
    return jax.eval_shape(model.init, jax.random.key(0), _sample_input(model))


def _shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return {name: tuple(np.shape(value)) for name, value in flat.items()}


def variable_problems(model: nn.Module, variables: Mapping[str, Any]) -> list[str]:
    """What keeps `variables` from being the module's (missing, unexpected or of another
    shape, by `collection/path` name); [] when they fit."""
    want = _shapes(abstract_variables(model))
    have = _shapes(variables)
    lines = [f"{k} is missing (expected {want[k]})" for k in want if k not in have]
    lines += [f"{k} is not part of the model" for k in have if k not in want]
    lines += [
        f"{k} has shape {have[k]}, expected {want[k]}"
        for k in want
        if have.get(k, want[k]) != want[k]
    ]
    return lines


def problem_text(problems: list[str]) -> str:
    """The first few problems as indented lines of a message, and how many more there are."""
    more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return "\n  - " + "\n  - ".join(problems[:_SHOWN]) + more


# ---- the two layouts ------------------------------------------------------------------------


def _official_tensors(model: nn.Module, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    params, stats = variables["params"], variables.get("batch_stats") or None
    if isinstance(model, MultiCropNetwork):
        return dict(official_state_dict(params, batch_stats=stats))
    state = official_state_dict({"backbone": params}, batch_stats=stats and {"backbone": stats})
    return {name.removeprefix("backbone."): value for name, value in state.items()}


def _official_variables(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    params, stats = from_state_dict(tensors)
    return {"params": params, **({"batch_stats": stats} if stats else {})}


def _check_layout(model: nn.Module, layout: str) -> None:
    if layout not in LAYOUTS:
        raise SafetensorsFileError(f"layout={layout!r:.40} is not one of {LAYOUTS}")
    if layout != "official":
        return
    if isinstance(_backbone(model), VisionTransformer3):
        raise SafetensorsFileError(
            "DINOv3's ViT has no official state-dict layout here: save it with layout='flax'"
        )
    if isinstance(model, MultiCropNetwork) and model.patch_head is not None:
        raise SafetensorsFileError(
            "the official MultiCropWrapper has no separate iBOT head (patch_head): save this "
            "network with layout='flax'"
        )


def _host_array(value: Any) -> np.ndarray:
    """A C-contiguous host copy: safetensors.numpy writes a tensor's buffer as it lies."""
    return np.asarray(value, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)


def save_safetensors(
    path: str | os.PathLike[str],
    model: nn.Module,
    variables: Mapping[str, Any],
    *,
    layout: str = "flax",
) -> None:
    """Write `variables` ({"params": ..., "batch_stats": ...} as `model.init` makes them) of
    `model` (a backbone or a MultiCropNetwork) to a .safetensors file in `layout` ("flax" or
    "official", see the module docstring), with the module's description in the metadata.

    The variables must be exactly the module's (names and shapes, BatchNorm statistics
    included): checked, with the differences listed, before anything is written.
    """
    if type(_backbone(model)) not in BACKBONE_FAMILIES:
        names = sorted(cls.__name__ for cls in BACKBONE_FAMILIES)
        raise SafetensorsFileError(
            f"a {type(model).__name__} is neither one of our backbones ({names}) nor a "
            "MultiCropNetwork of one"
        )
    _check_layout(model, layout)
    problems = variable_problems(model, variables)
    if problems:
        raise SafetensorsFileError(
            f"the variables are not those of the {type(model).__name__}:{problem_text(problems)}"
        )
    host = jax.tree.map(_host_array, dict(variables))
    if layout == "official":
        tensors = _official_tensors(model, host)
    else:
        tensors = traverse_util.flatten_dict(host, sep="/")
    metadata = {
        "format": "pt" if layout == "official" else "flax",
        "dino_jax.format": FORMAT_VERSION,
        "dino_jax.layout": layout,
        "dino_jax.family": BACKBONE_FAMILIES[type(_backbone(model))],
        "dino_jax.model": json.dumps(module_description(model), sort_keys=True),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def _described_model(path: str, metadata: Mapping[str, str], fields: Mapping[str, Any]):
    if metadata.get("dino_jax.format") != FORMAT_VERSION:
        found = metadata.get("dino_jax.format")
        raise SafetensorsFileError(
            f"{path}: no dino_jax weights description (dino_jax.format is {found!r:.20}, "
            f"expected {FORMAT_VERSION!r}): it was not written by save_safetensors. A "
            "transformers ViTModel directory loads with dino_jax.interop.hf.load_hf"
        )
    layout = metadata.get("dino_jax.layout")
    if layout not in LAYOUTS:
        raise SafetensorsFileError(f"{path}: layout {layout!r:.40} is not one of {LAYOUTS}")
    try:
        model = module_from_description(json.loads(metadata.get("dino_jax.model", "")))
    except (ValueError, TypeError) as err:
        raise SafetensorsFileError(f"{path}: bad dino_jax.model description: {err}") from None
    unknown = sorted(set(fields) - _field_names(type(_backbone(model))))
    if unknown:
        raise SafetensorsFileError(f"{type(_backbone(model)).__name__} has no field(s) {unknown}")
    if isinstance(model, MultiCropNetwork):  # overrides go to the backbone
        return layout, model.clone(backbone=model.backbone.clone(**fields))
    return layout, model.clone(**fields)


def load_safetensors(path: str | os.PathLike[str], **fields: Any) -> tuple[nn.Module, dict]:
    """(model, variables) of a file written by `save_safetensors`, in either layout: the
    module rebuilt from the file's description (`fields` override its backbone's fields:
    dtype, attention_impl, ...) and its variables as numpy arrays, bit for bit as saved.

    Refused with SafetensorsFileError naming the file: a file without our description, or
    tensors that are not exactly the described module's (listed)."""
    path = os.path.expanduser(os.fspath(path))
    try:
        with safe_open(path, framework="np") as f:
            layout, model = _described_model(path, f.metadata() or {}, fields)
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError) as err:
        raise SafetensorsFileError(f"{path}: not a readable .safetensors file ({err})") from None
    try:
        if layout == "official":
            variables = _official_variables(tensors)
        else:
            variables = traverse_util.unflatten_dict(tensors, sep="/")
    except ValueError as err:
        raise SafetensorsFileError(f"{path}: {err}") from None
    problems = variable_problems(model, variables)
    if problems:
        raise SafetensorsFileError(
            f"{path}: its tensors are not the {type(model).__name__} it describes:"
            f"{problem_text(problems)}"
        )
    return model, variables

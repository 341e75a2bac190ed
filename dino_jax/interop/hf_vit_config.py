"""The config.json side of dino_jax.interop.hf: the ViTConfig of transformers' `ViTModel`
that a DINO ViT is written with (`hf_config`), and the reading of a model directory's
config.json into VisionTransformer fields, refusing, with every reason listed, other model
types, task heads and values DINO's ViT cannot run (another activation or LayerNorm epsilon,
a non-square size). HFModelError, the error of both modules, is defined here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dino_jax.models.vit import LN_EPS, VisionTransformer

CONFIG = "config.json"

# ViTConfig's defaults (transformers' configuration_vit.py), for the keys a config.json omits.
VIT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
}
# The LayerNorm epsilons accepted: the official 1e-6 (vision_transformer.py), and ViTConfig's
# default 1e-12, which transformers' DINO conversion left in the facebook/dino-* configs
# (weights trained at 1e-6; our ViT runs them at 1e-6, the official model's value).
ACCEPTED_EPS = (LN_EPS, 1e-12)
# What other model types are, for the refusal (transformers' model_type names).
_OTHER_TYPES = {
    "dinov2": "DINOv2's ViT (its official dinov2_*_pretrain.pth loads with "
    "dino_jax.interop.dinov2.load_dinov2_pth)",
    "dinov2_with_registers": "DINOv2's ViT with registers (its official dinov2_*_reg4_pretrain"
    ".pth loads with dino_jax.interop.dinov2.load_dinov2_pth)",
    "dinov3_vit": "DINOv3's ViT",
}


class HFModelError(ValueError):
    """A transformers model directory that is not a DINO-compatible ViTModel (or a model that
    has no such layout)."""


# model.gelu -> transformers' hidden_act, and back
HF_GELUS = {"exact": "gelu", "tanh": "gelu_pytorch_tanh"}
OUR_GELUS = {hf: ours for ours, hf in HF_GELUS.items()}


def hf_config(model: VisionTransformer, dtype: Any = np.float32) -> dict[str, Any]:
    """The ViTConfig of `model` (a DINO VisionTransformer) as config.json holds it; `dtype`,
    of the weights, is written as `torch_dtype` (what from_pretrained(dtype="auto") uses)."""
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": model.embed_dim,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "intermediate_size": int(model.embed_dim * model.mlp_ratio),  # as vit.Block sizes it
        # transformers' exact (erf) GELU, the official nn.GELU, or its tanh approximation
        "hidden_act": HF_GELUS[getattr(model, "gelu", "exact")],
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": LN_EPS,
        "image_size": model.img_size,
        "patch_size": model.patch_size,
        "num_channels": 3,
        "qkv_bias": model.qkv_bias,
        "torch_dtype": np.dtype(dtype).name,
    }


def _read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG)
    if not os.path.isdir(directory):
        raise HFModelError(f"{directory}: not a directory (a transformers model directory)")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise HFModelError(
            f"{directory}: no {CONFIG}: not a transformers model directory"
        ) from None
    except (OSError, ValueError) as err:
        raise HFModelError(f"{path}: cannot read it as JSON ({err})") from None
    if not isinstance(config, dict):
        raise HFModelError(f"{path}: not a JSON object")
    return config


def _refuse_other_models(config: Mapping[str, Any], where: str) -> None:
    model_type = config.get("model_type")
    supported = (
        "only transformers' ViT loads into DINO's ViT (model_type 'vit', architectures "
        "['ViTModel']: the layout of facebook/dino-vits16, -vits8, -vitb16, -vitb8)"
    )
    if model_type != "vit":
        what = _OTHER_TYPES.get(model_type, "another model") if isinstance(model_type, str) else ""
        raise HFModelError(
            f"{where}: model_type is {model_type!r:.60}{f', {what}' if what else ''}: {supported}"
        )
    architectures = config.get("architectures") or ["ViTModel"]  # null: a bare ViTConfig
    if architectures != ["ViTModel"]:
        raise HFModelError(
            f"{where}: architectures is {architectures!r:.100}: {supported}. For a "
            "ViTForImageClassification (or another ViT with a task head), save its backbone "
            "with transformers (model.vit.save_pretrained(directory)) and load that"
        )


def _side(value: Any, what: str, problems: list[str]) -> int:
    """An int size, or a square [h, w] one."""
    if isinstance(value, list | tuple) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if type(value) is not int or value < 1:
        problems.append(f"{what} is {value!r:.40}: our ViT takes a positive int (square)")
        return 1
    return value


def _vit_fields(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """VisionTransformer fields of a ViTConfig; HFModelError listing every unsupported value."""
    c = {**VIT_DEFAULTS, **config}
    problems: list[str] = []
    sizes = {
        k: c[k]
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    }
    for key, value in sizes.items():
        if type(value) is not int or value < 1:
            problems.append(f"{key} is {value!r:.40}, not a positive int")
            sizes[key] = 1
    dim, heads, hidden = (
        sizes["hidden_size"],
        sizes["num_attention_heads"],
        sizes["intermediate_size"],
    )
    if dim % heads:
        problems.append(f"hidden_size {dim} is not a multiple of num_attention_heads {heads}")
    if c.get("head_dim", dim // heads) != dim // heads:
        problems.append(f"head_dim {c['head_dim']!r:.20} is not hidden_size / num_attention_heads")
    if int(dim * (hidden / dim)) != hidden:
        problems.append(f"intermediate_size {hidden} is no int(hidden_size * mlp_ratio)")
    if c["hidden_act"] not in OUR_GELUS:
        problems.append(
            f"hidden_act is {c['hidden_act']!r:.40}: DINO's ViT uses the exact GELU ('gelu'),"
            " or its tanh approximation ('gelu_pytorch_tanh', model.gelu='tanh')"
        )
    if c["layer_norm_eps"] not in ACCEPTED_EPS:
        problems.append(
            f"layer_norm_eps is {c['layer_norm_eps']!r:.40}: DINO's ViT normalises with "
            f"{LN_EPS} (accepted: {ACCEPTED_EPS})"
        )
    if c["num_channels"] != 3:
        problems.append(f"num_channels is {c['num_channels']!r:.20}: DINO's ViT takes RGB (3)")
    if not isinstance(c["qkv_bias"], bool):
        problems.append(f"qkv_bias is {c['qkv_bias']!r:.20}, not true or false")
    image = _side(c["image_size"], "image_size", problems)
    patch = _side(c["patch_size"], "patch_size", problems)
    if image % patch:
        problems.append(f"image_size {image} is not a multiple of patch_size {patch}")
    if problems:
        raise HFModelError(
            f"{where}: a ViT this reader cannot run as DINO's:\n  - " + "\n  - ".join(problems)
        )
    return {
        "patch_size": patch,
        "embed_dim": dim,
        "depth": sizes["num_hidden_layers"],
        "num_heads": heads,
        "mlp_ratio": hidden / dim,
        "qkv_bias": c["qkv_bias"],
        "img_size": image,
        "gelu": OUR_GELUS[c["hidden_act"]],
    }

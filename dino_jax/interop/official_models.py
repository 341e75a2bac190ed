"""The Flax modules that run an official file's weights: their keyword arguments, read off the
architecture its tensors declare (or off our param trees), for each backbone family."""

from __future__ import annotations

from typing import Any

import numpy as np

from dino_jax.interop.architecture import (
    AnyArchitecture,
    Architecture,
    ResNetArchitecture,
    XCiTArchitecture,
)
from dino_jax.models.vit import ARCHS

HEADS_BY_WIDTH = {spec["embed_dim"]: spec["num_heads"] for spec in ARCHS.values()}


def vit_heads(dim: int, num_heads: int | None = None, args=None) -> int:
    """A ViT's number of attention heads, which its tensors do not hold: `num_heads`, else
    the checkpoint's `args.arch` when it has this width, else the official size's."""
    if num_heads is not None:
        return num_heads
    trained = getattr(args, "arch", None)
    arch = ARCHS.get(trained, {}) if isinstance(trained, str) else {}
    if arch.get("embed_dim") == dim:
        return arch["num_heads"]
    if dim in HEADS_BY_WIDTH:
        return HEADS_BY_WIDTH[dim]
    raise ValueError(
        f"cannot tell the number of attention heads of a ViT of width {dim} from its "
        "weights; pass num_heads explicitly"
    )


def infer_backbone(backbone: dict[str, Any], num_heads: int | None = None, args=None) -> dict:
    """VisionTransformer keyword arguments read off a ViT backbone param tree."""
    dim = int(np.shape(backbone["cls_token"])[-1])
    depth = sum(1 for k in backbone if k.startswith("blocks_"))
    patch = int(np.shape(backbone["patch_embed"]["proj"]["kernel"])[0])
    n_pos = int(np.shape(backbone["pos_embed"])[1]) - 1
    grid = round(n_pos**0.5)
    hidden = int(np.shape(backbone["blocks_0"]["mlp"]["fc1"]["kernel"])[1])
    return {
        "patch_size": patch,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": vit_heads(dim, num_heads, args),
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


def backbone_kwargs(a: AnyArchitecture, num_heads: int | None = None, args=None) -> dict:
    """The keyword arguments of the backbone module of architecture `a` (VisionTransformer,
    ResNet or XCiT). For an XCiT of an xcit.py size, `tokens_norm` is that constructor's
    (False for the nano models); its layer-scale init `eta` only matters for a fresh init."""
    if isinstance(a, ResNetArchitecture):
        return {"stem_width": a.stem_width, "widths": a.widths, "depths": a.depths}
    if isinstance(a, XCiTArchitecture):
        from dino_jax.models.xcit import XCIT_ARCHS

        sizes = (a.patch_size, a.embed_dim, a.depth, a.num_heads)
        known = [
            spec
            for spec in XCIT_ARCHS.values()
            if (spec["patch_size"], spec["embed_dim"], spec["depth"], spec["num_heads"]) == sizes
        ]
        return {
            "patch_size": a.patch_size,
            "embed_dim": a.embed_dim,
            "depth": a.depth,
            "num_heads": a.num_heads,
            "mlp_ratio": a.mlp_hidden / a.embed_dim,
            "qkv_bias": a.qkv_bias,
            "cls_attn_layers": a.cls_attn_layers,
            **({"tokens_norm": known[0]["tokens_norm"]} if known else {}),
        }
    vit: Architecture = a
    return {
        "patch_size": vit.patch_size,
        "embed_dim": vit.embed_dim,
        "depth": vit.depth,
        "num_heads": vit_heads(vit.embed_dim, num_heads, args),
        "mlp_ratio": vit.mlp_hidden / vit.embed_dim,
        "qkv_bias": vit.qkv_bias,
        **({"img_size": vit.grid * vit.patch_size} if vit.grid is not None else {}),
    }


def backbone_module(a: AnyArchitecture, *, num_heads: int | None = None, args=None, **fields):
    """The backbone module (not initialised) of architecture `a` (its head, if any, is not
    part of it: see `infer_head` for a DINOHead); `fields` override module
    fields (dtype, param_dtype, ...; `attention_impl` is a ViT's only and is dropped for the
    other families). `num_heads` / `args`: a ViT's heads, as `vit_heads`."""
    if isinstance(a, ResNetArchitecture):
        from dino_jax.models.resnet import ResNet as module
    elif isinstance(a, XCiTArchitecture):
        from dino_jax.models.xcit import XCiT as module
    else:
        from dino_jax.models.vit import VisionTransformer as module
    if module.__name__ != "VisionTransformer":
        fields.pop("attention_impl", None)
    return module(**{**backbone_kwargs(a, num_heads, args), **fields})

"""The state-dict shapes of XCiT (facebookresearch/xcit's xcit.py, as `main_dino.py --arch
xcit_*` builds it through torch.hub, its classifier replaced by Identity), and the XCiT a
file declares. Unlike a ViT's, an XCiT's number of heads is in its tensors: the XCA
`temperature` is [heads, 1, 1]."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dino_jax.interop.architecture_common import (
    IN_CHANNELS,
    Head,
    Shape,
    batch_norm_shapes,
    block_indices,
)
from dino_jax.models.backbones import XCIT_ARCHS

PATCH_CONVS = {16: 4, 8: 3}  # ConvPatchEmbed: stride-2 3x3 convs for patch 16 / 8
FOURIER_DIM = 64  # PositionalEncodingFourier: 2 x hidden_dim (32) channels -> embed_dim
CLS_ATTN_LAYERS = 2  # XCiT's default, used by every xcit.py constructor


@dataclasses.dataclass(frozen=True)
class XCiTArchitecture:
    """The sizes that fix an XCiT's state dict; `head` is None for a backbone alone."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_hidden: int
    qkv_bias: bool = True
    cls_attn_layers: int = CLS_ATTN_LAYERS
    head: Head | None = None


def from_sizes(sizes: Mapping[str, Any]) -> XCiTArchitecture:
    """From `dino_jax.models.backbones.xcit_sizes(config.model)` (mlp_ratio 4, qkv_bias, as
    all of xcit.py's constructors)."""
    values = [sizes[k] for k in ("embed_dim", "depth", "num_heads", "patch_size")]
    if not all(type(v) is int and v > 0 for v in values):
        raise ValueError("the XCiT sizes are not positive ints")
    dim, depth, heads, patch = values
    return XCiTArchitecture(dim, depth, heads, patch, 4 * dim)


def _patch_embed_widths(a: XCiTArchitecture) -> list[int]:
    n = PATCH_CONVS.get(a.patch_size, 0)
    return [a.embed_dim // 2 ** (n - 1 - i) for i in range(n)]  # D/8, D/4, D/2, D at 16


def _mlp(prefix: str, dim: int, hidden: int) -> dict[str, Shape]:
    return {
        prefix + "mlp.fc1.weight": (hidden, dim),
        prefix + "mlp.fc1.bias": (hidden,),
        prefix + "mlp.fc2.weight": (dim, hidden),
        prefix + "mlp.fc2.bias": (dim,),
    }


def _attention(prefix: str, a: XCiTArchitecture) -> dict[str, Shape]:
    d = a.embed_dim
    shapes: dict[str, Shape] = {prefix + "qkv.weight": (3 * d, d)}
    shapes.update({prefix + "qkv.bias": (3 * d,)} if a.qkv_bias else {})
    return shapes | {prefix + "proj.weight": (d, d), prefix + "proj.bias": (d,)}


def _norm(name: str, dim: int) -> dict[str, Shape]:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}


def backbone_shapes(a: XCiTArchitecture) -> dict[str, Shape]:
    """xcit.py's XCiT state-dict names (prefixed `backbone.`) and shapes, in its order."""
    d, h = a.embed_dim, a.mlp_hidden
    shapes: dict[str, Shape] = {"cls_token": (1, 1, d)}
    width = IN_CHANNELS
    for i, out in enumerate(_patch_embed_widths(a)):  # Sequential(conv3x3, GELU, ...)
        shapes[f"patch_embed.proj.{2 * i}.0.weight"] = (out, width, 3, 3)
        shapes.update(batch_norm_shapes(f"patch_embed.proj.{2 * i}.1", out))
        width = out
    for i in range(a.depth):
        p = f"blocks.{i}."
        shapes.update({p + g: (d,) for g in ("gamma1", "gamma2", "gamma3")})
        shapes.update(_norm(p + "norm1", d))
        shapes[p + "attn.temperature"] = (a.num_heads, 1, 1)
        shapes.update(_attention(p + "attn.", a))
        shapes.update(_norm(p + "norm2", d) | _mlp(p, d, h) | _norm(p + "norm3", d))
        for conv in ("conv1", "conv2"):  # depthwise 3x3 (groups = D), with bias
            shapes[f"{p}local_mp.{conv}.weight"] = (d, 1, 3, 3)
            shapes[f"{p}local_mp.{conv}.bias"] = (d,)
            if conv == "conv1":
                shapes.update(batch_norm_shapes(p + "local_mp.bn", d))
    for i in range(a.cls_attn_layers):
        p = f"cls_attn_blocks.{i}."
        shapes.update({p + "gamma1": (d,), p + "gamma2": (d,)})
        shapes.update(_norm(p + "norm1", d) | _attention(p + "attn.", a))
        shapes.update(_norm(p + "norm2", d) | _mlp(p, d, h))
    shapes.update(_norm("norm", d))
    shapes["pos_embeder.token_projection.weight"] = (d, FOURIER_DIM, 1, 1)
    shapes["pos_embeder.token_projection.bias"] = (d,)
    return {f"backbone.{name}": shape for name, shape in shapes.items()}


def is_xcit(shapes: Mapping[str, Shape]) -> bool:
    return any(
        name.startswith(("backbone.cls_attn_blocks.", "backbone.pos_embeder.")) for name in shapes
    )


def from_shapes(shapes: Mapping[str, Shape]) -> XCiTArchitecture:
    """The XCiT a state dict's own tensors declare (names normalised to `backbone.`), read
    off a few of them; ValueError if even those are missing or malformed."""
    cls = shapes.get("backbone.cls_token")
    if cls is None or len(cls) != 3 or cls[:2] != (1, 1) or cls[2] < 1:
        raise ValueError(f"backbone.cls_token has shape {cls}, not (1, 1, embed_dim)")
    dim = cls[2]
    convs = len(block_indices(shapes, "backbone.patch_embed.proj."))
    patch = {n: p for p, n in PATCH_CONVS.items()}.get(convs)
    if patch is None:
        raise ValueError(
            f"backbone.patch_embed.proj has {convs} conv layers; XCiT's has 4 (patch 16) or 3 "
            "(patch 8)"
        )
    temperature = shapes.get("backbone.blocks.0.attn.temperature")
    if temperature is None or len(temperature) != 3 or temperature[0] < 1:
        raise ValueError(
            f"backbone.blocks.0.attn.temperature has shape {temperature}, not (heads, 1, 1)"
        )
    depth = len(block_indices(shapes, "backbone.blocks."))
    fc1 = shapes.get("backbone.blocks.0.mlp.fc1.weight")
    return XCiTArchitecture(
        embed_dim=dim,
        depth=depth,
        num_heads=temperature[0],
        patch_size=patch,
        mlp_hidden=fc1[0] if fc1 is not None and len(fc1) == 2 else 4 * dim,
        qkv_bias="backbone.blocks.0.attn.qkv.bias" in shapes,
        cls_attn_layers=len(block_indices(shapes, "backbone.cls_attn_blocks.")),
    )


def _name(a: XCiTArchitecture) -> str | None:
    sizes = (a.patch_size, a.embed_dim, a.depth, a.num_heads)
    for name, spec in XCIT_ARCHS.items():
        if (spec["patch_size"], spec["embed_dim"], spec["depth"], spec["num_heads"]) == sizes:
            return name
    return None


def describe(a: XCiTArchitecture) -> str:
    text = _name(a) or f"an XCiT/{a.patch_size}"
    return f"{text} (embed_dim {a.embed_dim}, depth {a.depth}, {a.num_heads} heads)"


def settings_for(a: XCiTArchitecture) -> dict[str, Any]:
    name = _name(a)
    out: dict[str, Any] = {"model.arch": name} if name else {
        "model.arch": "xcit",
        "model.embed_dim": a.embed_dim,
        "model.depth": a.depth,
        "model.num_heads": a.num_heads,
    }  # fmt: skip
    out["model.patch_size"] = a.patch_size  # the config must repeat a name's patch size
    return out

"""The shapes an official DINO state dict must have: for a configured model, or for the
backbone (ViT, ResNet or XCiT) and head that a file's own tensors declare. Shapes only:
nothing here needs the tensors' bytes, so a file can be checked from its pickle before
anything large is read. The ViT is described here; architecture_resnet.py and
architecture_xcit.py describe the other two families.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from dino_jax.interop import architecture_resnet, architecture_xcit
from dino_jax.interop.architecture_common import (
    IN_CHANNELS,
    Head,
    Shape,
    block_indices,
    head_of,
    head_shapes,
)
from dino_jax.interop.architecture_resnet import ResNetArchitecture
from dino_jax.interop.architecture_xcit import XCiTArchitecture
from dino_jax.models.backbones import family, resnet_sizes, xcit_sizes
from dino_jax.models.vit import ARCHS

__all__ = [
    "IN_CHANNELS",
    "MAX_POS_GRID",
    "Architecture",
    "Head",
    "ResNetArchitecture",
    "Shape",
    "XCiTArchitecture",
    "backbone_family",
    "describe",
    "differences",
    "from_model_config",
    "from_state_shapes",
    "head_shapes",
    "pos_grid",
    "settings_for",
    "state_shapes",
]

# The largest position grid accepted: 256 x 256 patches (4096 px at patch 16). Official DINO
# models use 14 x 14 or 28 x 28; a larger grid is a damaged or hostile file, not a ViT.
MAX_POS_GRID = 256


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What fixes the shapes of a DINO ViT's state dict; `grid` is the side of the position
    grid (None: any square grid up to MAX_POS_GRID); `head` is None for a backbone alone."""

    embed_dim: int
    depth: int
    patch_size: int
    mlp_hidden: int
    qkv_bias: bool = True
    grid: int | None = None
    head: Head | None = None


AnyArchitecture = Architecture | ResNetArchitecture | XCiTArchitecture
_FAMILY_NAMES = {Architecture: "ViT", ResNetArchitecture: "ResNet", XCiTArchitecture: "XCiT"}


def backbone_family(a: AnyArchitecture) -> str:
    """The family of `a`: "ViT", "ResNet" or "XCiT"."""
    return _FAMILY_NAMES[type(a)]


def _head_of_config(m: Any) -> Head:
    sizes = [m.out_dim, m.head_bottleneck_dim, m.head_nlayers]
    sizes += [m.head_hidden_dim] if m.head_nlayers > 1 else []
    if not all(type(n) is int and n > 0 for n in sizes):
        raise ValueError("the model config has head sizes that are not positive ints")
    return Head(
        m.head_nlayers, m.head_hidden_dim, m.head_bottleneck_dim, m.out_dim, m.use_bn_in_head
    )


def from_model_config(m: Any, img_size: int | None = None) -> AnyArchitecture:
    """The architecture `recipe.build_network` builds from `config.model` (`m`); a ViT's is
    trained on crops of `img_size` (config.aug.global_size), which fixes its position grid
    (ResNets and XCiTs take any input size). DINOv2's and DINOv3's ViTs have no official
    DINO state dict: ValueError."""
    kind = family(m.arch)
    if kind in ("dinov2", "dinov3"):
        raise ValueError(f"model.arch={m.arch!r} has no official DINO state-dict layout")
    head = _head_of_config(m)
    if kind == "resnet":
        return dataclasses.replace(architecture_resnet.from_sizes(resnet_sizes(m)), head=head)
    if kind == "xcit":
        return dataclasses.replace(architecture_xcit.from_sizes(xcit_sizes(m)), head=head)
    if m.arch == "custom":
        embed_dim, depth = m.embed_dim, m.depth
    else:
        embed_dim, depth = ARCHS[m.arch]["embed_dim"], ARCHS[m.arch]["depth"]
    if not all(type(n) is int and n > 0 for n in (embed_dim, depth, m.patch_size)):
        raise ValueError("the model config has sizes that are not positive ints")
    grid = None if img_size is None else img_size // m.patch_size
    return Architecture(embed_dim, depth, m.patch_size, 4 * embed_dim, True, grid, head)


def backbone_shapes(a: Architecture) -> dict[str, Shape]:
    """Official VisionTransformer state-dict names (prefixed `backbone.`) and shapes; the
    position embedding only when the grid is fixed."""
    d, h, p = a.embed_dim, a.mlp_hidden, a.patch_size
    shapes: dict[str, Shape] = {"cls_token": (1, 1, d)}
    if a.grid is not None:
        shapes["pos_embed"] = (1, a.grid * a.grid + 1, d)
    shapes["patch_embed.proj.weight"] = (d, IN_CHANNELS, p, p)
    shapes["patch_embed.proj.bias"] = (d,)
    for i in range(a.depth):
        block = {
            "norm1.weight": (d,),
            "norm1.bias": (d,),
            "attn.qkv.weight": (3 * d, d),
            **({"attn.qkv.bias": (3 * d,)} if a.qkv_bias else {}),
            "attn.proj.weight": (d, d),
            "attn.proj.bias": (d,),
            "norm2.weight": (d,),
            "norm2.bias": (d,),
            "mlp.fc1.weight": (h, d),
            "mlp.fc1.bias": (h,),
            "mlp.fc2.weight": (d, h),
            "mlp.fc2.bias": (d,),
        }
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
    return {f"backbone.{name}": shape for name, shape in shapes.items()}


def state_shapes(a: AnyArchitecture) -> dict[str, Shape]:
    """Every entry of the network's official state dict (backbone., head.) with its shape."""
    if isinstance(a, ResNetArchitecture):
        shapes = architecture_resnet.backbone_shapes(a)
    elif isinstance(a, XCiTArchitecture):
        shapes = architecture_xcit.backbone_shapes(a)
    else:
        shapes = backbone_shapes(a)
    if a.head is not None:
        shapes.update(head_shapes(a.head, a.embed_dim))
    return shapes


def pos_grid(shape: Shape | None, embed_dim: int) -> int | None:
    """The side of the square position grid of a (1, 1 + g*g, D) pos_embed, or None."""
    if shape is None or len(shape) != 3 or shape[0] != 1 or shape[2] != embed_dim:
        return None
    side = math.isqrt(max(shape[1] - 1, 0))
    return side if side * side == shape[1] - 1 and 0 < side <= MAX_POS_GRID else None


def _vit_from_state_shapes(shapes: Mapping[str, Shape]) -> Architecture:
    """The architecture a state dict's own tensors declare (names normalised to `backbone.`
    and `head.`), read off a few of them; ValueError if even those are missing or malformed."""
    cls = shapes.get("backbone.cls_token")
    if cls is None or len(cls) != 3 or cls[:2] != (1, 1) or cls[2] < 1:
        raise ValueError(f"backbone.cls_token has shape {cls}, not (1, 1, embed_dim)")
    dim = cls[2]
    kernel = shapes.get("backbone.patch_embed.proj.weight")
    if kernel is None or len(kernel) != 4 or kernel[2] != kernel[3] or kernel[2] < 1:
        raise ValueError(
            f"backbone.patch_embed.proj.weight has shape {kernel}, not (embed_dim, 3, p, p)"
        )
    fc1 = shapes.get("backbone.blocks.0.mlp.fc1.weight")
    hidden = fc1[0] if fc1 is not None and len(fc1) == 2 else 4 * dim
    pos = shapes.get("backbone.pos_embed")
    grid = pos_grid(pos, dim)
    if grid is None:
        raise ValueError(
            f"backbone.pos_embed has shape {pos}, not (1, 1 + g*g, {dim}) for a square grid of "
            f"side g <= {MAX_POS_GRID}"
        )
    depth = len(block_indices(shapes, "backbone.blocks."))
    if depth == 0:
        raise ValueError("the backbone has no transformer blocks (backbone.blocks.*)")
    return Architecture(
        embed_dim=dim,
        depth=depth,
        patch_size=kernel[2],
        mlp_hidden=hidden,
        qkv_bias="backbone.blocks.0.attn.qkv.bias" in shapes,
        grid=grid,
        head=head_of(shapes),
    )


def from_state_shapes(shapes: Mapping[str, Shape]) -> AnyArchitecture:
    """The architecture a state dict's own tensors declare (names normalised to `backbone.`
    and `head.`): a ResNet if it has a 7x7 stem `conv1`, an XCiT if it has class-attention
    blocks or a Fourier position encoder, else a ViT; read off a few tensors, ValueError if
    even those are missing or malformed."""
    if architecture_resnet.is_resnet(shapes):
        backbone = architecture_resnet.from_shapes(shapes)
    elif architecture_xcit.is_xcit(shapes):
        backbone = architecture_xcit.from_shapes(shapes)
    else:
        return _vit_from_state_shapes(shapes)
    return dataclasses.replace(backbone, head=head_of(shapes))


def differences(expected: Mapping[str, Shape], found: Mapping[str, Shape]) -> list[str]:
    """Each entry missing, unexpected, or of another shape, as short readable lines."""
    lines = []
    for name, shape in expected.items():
        if name not in found:
            lines.append(f"{name} is missing (expected {shape})")
        elif tuple(found[name]) != shape:
            lines.append(f"{name} has shape {tuple(found[name])}, expected {shape}")
    lines += [f"{name} is not part of the model" for name in found if name not in expected]
    return lines


def _vit_text(a: Architecture) -> str:
    names = [
        name
        for name, spec in ARCHS.items()
        if (spec["embed_dim"], spec["depth"]) == (a.embed_dim, a.depth)
    ]
    text = f"{names[0]}/{a.patch_size}" if names else f"a ViT/{a.patch_size}"
    text += f" (embed_dim {a.embed_dim}, depth {a.depth})"
    if a.grid is not None:
        text += f" at {a.grid * a.patch_size} px ({a.grid}x{a.grid} positions)"
    return text


def describe(a: AnyArchitecture) -> str:
    """A one-line summary, naming the official size when it is one."""
    if isinstance(a, ResNetArchitecture):
        text = architecture_resnet.describe(a)
    elif isinstance(a, XCiTArchitecture):
        text = architecture_xcit.describe(a)
    else:
        text = _vit_text(a)
    if a.head is None:
        return text + ", no head"
    h = a.head
    text += f", head out_dim {h.out_dim}, {h.nlayers} layers, bottleneck {h.bottleneck_dim}"
    return (
        text + (f", hidden {h.hidden_dim}" if h.nlayers > 1 else "") + (", BN" if h.use_bn else "")
    )


def _vit_settings(a: Architecture) -> dict[str, Any]:
    names = [n for n, s in ARCHS.items() if (s["embed_dim"], s["depth"]) == (a.embed_dim, a.depth)]
    out: dict[str, Any] = (
        {"model.arch": names[0]}
        if names
        else {
            "model.arch": "custom",
            "model.embed_dim": a.embed_dim,
            "model.depth": a.depth,
        }
    )
    out["model.patch_size"] = a.patch_size
    if a.grid is not None:
        out["aug.global_size"] = a.grid * a.patch_size
    return out


def settings_for(a: AnyArchitecture) -> dict[str, Any]:
    """The config settings (dotted keys) that build the architecture `a`."""
    if isinstance(a, ResNetArchitecture):
        out = architecture_resnet.settings_for(a)
    elif isinstance(a, XCiTArchitecture):
        out = architecture_xcit.settings_for(a)
    else:
        out = _vit_settings(a)
    if a.head is not None:
        out["model.out_dim"] = a.head.out_dim
        out["model.head_nlayers"] = a.head.nlayers
        out["model.head_bottleneck_dim"] = a.head.bottleneck_dim
        if a.head.nlayers > 1:
            out["model.head_hidden_dim"] = a.head.hidden_dim
        out["model.use_bn_in_head"] = a.head.use_bn
    return out

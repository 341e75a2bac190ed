"""The shapes an official DINO state dict must have: for a configured model, or for the ViT and
head that a file's own tensors declare. Shapes only: nothing here needs the tensors' bytes, so
a file can be checked from its pickle before anything large is read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from dino_jax.models.vit import ARCHS

Shape = tuple[int, ...]

# The largest position grid accepted: 256 x 256 patches (4096 px at patch 16). Official DINO
# models use 14 x 14 or 28 x 28; a larger grid is a damaged or hostile file, not a ViT.
MAX_POS_GRID = 256
IN_CHANNELS = 3  # RGB: what the official patch embedding and our data pipeline use


@dataclasses.dataclass(frozen=True)
class Head:
    """DINOHead sizes (official names: nlayers, hidden_dim, bottleneck_dim, out_dim, use_bn)."""

    nlayers: int
    hidden_dim: int
    bottleneck_dim: int
    out_dim: int
    use_bn: bool


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What fixes the shapes of a DINO network's state dict; `grid` is the side of the position
    grid (None: any square grid up to MAX_POS_GRID); `head` is None for a backbone alone."""

    embed_dim: int
    depth: int
    patch_size: int
    mlp_hidden: int
    qkv_bias: bool = True
    grid: int | None = None
    head: Head | None = None


def from_model_config(m: Any, img_size: int | None = None) -> Architecture:
    """The architecture `recipe.build_network` builds from `config.model` (`m`), trained on
    crops of `img_size` (config.aug.global_size), which fixes the position grid."""
    if m.arch == "custom":
        embed_dim, depth = m.embed_dim, m.depth
    elif m.arch in ARCHS:
        embed_dim, depth = ARCHS[m.arch]["embed_dim"], ARCHS[m.arch]["depth"]
    else:
        raise ValueError(f"model.arch={m.arch!r} is not a known architecture")
    sizes = [embed_dim, depth, m.patch_size, m.out_dim, m.head_bottleneck_dim, m.head_nlayers]
    sizes += [m.head_hidden_dim] if m.head_nlayers > 1 else []
    if not all(type(n) is int and n > 0 for n in sizes):
        raise ValueError("the model config has sizes that are not positive ints")
    head = Head(
        m.head_nlayers, m.head_hidden_dim, m.head_bottleneck_dim, m.out_dim, m.use_bn_in_head
    )
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


def head_shapes(head: Head, in_dim: int) -> dict[str, Shape]:
    """Official DINOHead state-dict names (prefixed `head.`) and shapes, as nn.Sequential
    numbers its layers (a GELU takes an index too)."""
    shapes: dict[str, Shape] = {}
    if head.nlayers == 1:
        shapes.update(
            {"mlp.weight": (head.bottleneck_dim, in_dim), "mlp.bias": (head.bottleneck_dim,)}
        )
    else:
        index, width = 0, in_dim
        for _ in range(head.nlayers - 1):
            shapes[f"mlp.{index}.weight"] = (head.hidden_dim, width)
            shapes[f"mlp.{index}.bias"] = (head.hidden_dim,)
            width, index = head.hidden_dim, index + 1
            if head.use_bn:
                for name in ("weight", "bias", "running_mean", "running_var"):
                    shapes[f"mlp.{index}.{name}"] = (width,)
                shapes[f"mlp.{index}.num_batches_tracked"] = ()
                index += 1
            index += 1  # the GELU
        shapes[f"mlp.{index}.weight"] = (head.bottleneck_dim, width)
        shapes[f"mlp.{index}.bias"] = (head.bottleneck_dim,)
    shapes["last_layer.weight_g"] = (head.out_dim, 1)
    shapes["last_layer.weight_v"] = (head.out_dim, head.bottleneck_dim)
    return {f"head.{name}": shape for name, shape in shapes.items()}


def state_shapes(a: Architecture) -> dict[str, Shape]:
    """Every entry of the network's official state dict (backbone., head.) with its shape."""
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


def _block_indices(shapes: Mapping[str, Shape], prefix: str) -> list[int]:
    found = set()
    for name in shapes:
        rest = name[len(prefix) :] if name.startswith(prefix) else ""
        index = rest.split(".", 1)[0]
        if index.isdigit():
            found.add(int(index))
    return sorted(found)


def _head_of(shapes: Mapping[str, Shape]) -> Head | None:
    if not any(name.startswith("head.") for name in shapes):
        return None
    v = shapes.get("head.last_layer.weight_v")
    if v is None or len(v) != 2:
        raise ValueError("head.last_layer.weight_v is missing or not 2-D")
    out_dim, bottleneck = v
    if "head.mlp.weight" in shapes:
        return Head(1, 0, bottleneck, out_dim, False)
    layers = _block_indices(shapes, "head.mlp.")
    linear = [i for i in layers if len(shapes.get(f"head.mlp.{i}.weight", ())) == 2]
    if not linear:
        raise ValueError("the head has no linear layer (head.mlp.*.weight)")
    hidden = shapes[f"head.mlp.{linear[0]}.weight"][0]
    return Head(len(linear), hidden, bottleneck, out_dim, len(layers) > len(linear))


def from_state_shapes(shapes: Mapping[str, Shape]) -> Architecture:
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
    depth = len(_block_indices(shapes, "backbone.blocks."))
    if depth == 0:
        raise ValueError("the backbone has no transformer blocks (backbone.blocks.*)")
    return Architecture(
        embed_dim=dim,
        depth=depth,
        patch_size=kernel[2],
        mlp_hidden=hidden,
        qkv_bias="backbone.blocks.0.attn.qkv.bias" in shapes,
        grid=grid,
        head=_head_of(shapes),
    )


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


def describe(a: Architecture) -> str:
    """A one-line summary, naming the official size when it is one."""
    names = [
        name
        for name, spec in ARCHS.items()
        if (spec["embed_dim"], spec["depth"]) == (a.embed_dim, a.depth)
    ]
    text = f"{names[0]}/{a.patch_size}" if names else f"a ViT/{a.patch_size}"
    text += f" (embed_dim {a.embed_dim}, depth {a.depth})"
    if a.grid is not None:
        text += f" at {a.grid * a.patch_size} px ({a.grid}x{a.grid} positions)"
    if a.head is None:
        return text + ", no head"
    h = a.head
    text += f", head out_dim {h.out_dim}, {h.nlayers} layers, bottleneck {h.bottleneck_dim}"
    return (
        text + (f", hidden {h.hidden_dim}" if h.nlayers > 1 else "") + (", BN" if h.use_bn else "")
    )


def settings_for(a: Architecture) -> dict[str, Any]:
    """The config settings (dotted keys) that build the architecture `a`."""
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
    if a.head is not None:
        out["model.out_dim"] = a.head.out_dim
        out["model.head_nlayers"] = a.head.nlayers
        out["model.head_bottleneck_dim"] = a.head.bottleneck_dim
        if a.head.nlayers > 1:
            out["model.head_hidden_dim"] = a.head.hidden_dim
        out["model.use_bn_in_head"] = a.head.use_bn
    return out

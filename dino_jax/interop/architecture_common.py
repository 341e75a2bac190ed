"""What every backbone family's state-dict shapes share: the DINO head, BatchNorm entries and
the numbering of nn.Sequential / nn.ModuleList children."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

Shape = tuple[int, ...]
IN_CHANNELS = 3  # RGB: what the official patch embeddings / stems and our data pipeline use


@dataclasses.dataclass(frozen=True)
class Head:
    """DINOHead sizes (official names: nlayers, hidden_dim, bottleneck_dim, out_dim, use_bn)."""

    nlayers: int
    hidden_dim: int
    bottleneck_dim: int
    out_dim: int
    use_bn: bool


def batch_norm_shapes(name: str, width: int) -> dict[str, Shape]:
    """The state-dict entries of a BatchNorm layer `name` (parameters, then buffers)."""
    shapes = {f"{name}.{leaf}": (width,) for leaf in ("weight", "bias")}
    shapes.update({f"{name}.{leaf}": (width,) for leaf in ("running_mean", "running_var")})
    shapes[f"{name}.num_batches_tracked"] = ()
    return shapes


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
                shapes.update(batch_norm_shapes(f"mlp.{index}", width))
                index += 1
            index += 1  # the GELU
        shapes[f"mlp.{index}.weight"] = (head.bottleneck_dim, width)
        shapes[f"mlp.{index}.bias"] = (head.bottleneck_dim,)
    shapes["last_layer.weight_g"] = (head.out_dim, 1)
    shapes["last_layer.weight_v"] = (head.out_dim, head.bottleneck_dim)
    return {f"head.{name}": shape for name, shape in shapes.items()}


def block_indices(shapes: Mapping[str, Shape], prefix: str) -> list[int]:
    """The indices `i` of the entries named `prefix + 'i.'...`, sorted."""
    found = set()
    for name in shapes:
        rest = name[len(prefix) :] if name.startswith(prefix) else ""
        index = rest.split(".", 1)[0]
        if index.isdigit():
            found.add(int(index))
    return sorted(found)


def head_of(shapes: Mapping[str, Shape]) -> Head | None:
    """The DINOHead that the `head.*` entries declare, None without any."""
    if not any(name.startswith("head.") for name in shapes):
        return None
    v = shapes.get("head.last_layer.weight_v")
    if v is None or len(v) != 2:
        raise ValueError("head.last_layer.weight_v is missing or not 2-D")
    out_dim, bottleneck = v
    if "head.mlp.weight" in shapes:
        return Head(1, 0, bottleneck, out_dim, False)
    layers = block_indices(shapes, "head.mlp.")
    linear = [i for i in layers if len(shapes.get(f"head.mlp.{i}.weight", ())) == 2]
    if not linear:
        raise ValueError("the head has no linear layer (head.mlp.*.weight)")
    hidden = shapes[f"head.mlp.{linear[0]}.weight"][0]
    return Head(len(linear), hidden, bottleneck, out_dim, len(layers) > len(linear))


def flag_value(value) -> str:
    """A config value as a command-line override writes it (tuples without spaces)."""
    if isinstance(value, tuple):
        return "(" + ",".join(str(v) for v in value) + ")"
    return str(value)

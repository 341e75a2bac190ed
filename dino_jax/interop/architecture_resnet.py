"""The state-dict shapes of torchvision's Bottleneck ResNet (`main_dino.py --arch resnet50`,
`fc` replaced by Identity, so there are no `fc.*` entries), and the ResNet a file declares."""

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
from dino_jax.models.backbones import RESNET_ARCHS

EXPANSION = 4  # torchvision's Bottleneck.expansion: a stage outputs 4 * its width


@dataclasses.dataclass(frozen=True)
class ResNetArchitecture:
    """torchvision's ResNet(Bottleneck, depths) with the stem width and the per-stage
    bottleneck widths (`planes`) as sizes; `head` is None for a backbone alone."""

    stem_width: int
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    head: Head | None = None

    @property
    def embed_dim(self) -> int:
        """The pooled feature width, which the DINO head takes."""
        return EXPANSION * self.widths[-1]


def from_sizes(sizes: Mapping[str, Any]) -> ResNetArchitecture:
    """From `dino_jax.models.backbones.resnet_sizes(config.model)`."""
    widths, depths = tuple(sizes["widths"]), tuple(sizes["depths"])
    values = [sizes["stem_width"], *widths, *depths]
    if not widths or len(widths) != len(depths) or not all(_positive(v) for v in values):
        raise ValueError("the ResNet sizes are not positive ints, one width and depth a stage")
    return ResNetArchitecture(sizes["stem_width"], widths, depths)


def _positive(value: Any) -> bool:
    return type(value) is int and value > 0


def backbone_shapes(a: ResNetArchitecture) -> dict[str, Shape]:
    """torchvision ResNet state-dict names (prefixed `backbone.`) and shapes. As
    ResNet._make_layer, the first block of a stage gets `downsample` when it strides
    (stages 2 on) or changes the channel count."""
    shapes: dict[str, Shape] = {"conv1.weight": (a.stem_width, IN_CHANNELS, 7, 7)}
    shapes.update(batch_norm_shapes("bn1", a.stem_width))
    inplanes = a.stem_width
    for s, (width, depth) in enumerate(zip(a.widths, a.depths, strict=True), start=1):
        out = EXPANSION * width
        for b in range(depth):
            p = f"layer{s}.{b}."
            shapes[p + "conv1.weight"] = (width, inplanes, 1, 1)
            shapes.update(batch_norm_shapes(p + "bn1", width))
            shapes[p + "conv2.weight"] = (width, width, 3, 3)
            shapes.update(batch_norm_shapes(p + "bn2", width))
            shapes[p + "conv3.weight"] = (out, width, 1, 1)
            shapes.update(batch_norm_shapes(p + "bn3", out))
            if b == 0 and (s > 1 or inplanes != out):
                shapes[p + "downsample.0.weight"] = (out, inplanes, 1, 1)
                shapes.update(batch_norm_shapes(p + "downsample.1", out))
            inplanes = out
    return {f"backbone.{name}": shape for name, shape in shapes.items()}


def is_resnet(shapes: Mapping[str, Shape]) -> bool:
    return "backbone.conv1.weight" in shapes


def from_shapes(shapes: Mapping[str, Shape]) -> ResNetArchitecture:
    """The ResNet a state dict's own tensors declare (names normalised to `backbone.`), read
    off the stem and the first 1x1 conv of every block; ValueError if those are malformed."""
    stem = shapes.get("backbone.conv1.weight")
    if stem is None or len(stem) != 4 or stem[1:] != (IN_CHANNELS, 7, 7) or stem[0] < 1:
        raise ValueError(
            f"backbone.conv1.weight has shape {stem}, not (stem_width, 3, 7, 7) as in "
            "torchvision's ResNet"
        )
    widths, depths = [], []
    while blocks := block_indices(shapes, f"backbone.layer{len(widths) + 1}."):
        first = shapes.get(f"backbone.layer{len(widths) + 1}.0.conv1.weight")
        if first is None or len(first) != 4 or first[0] < 1:
            raise ValueError(
                f"backbone.layer{len(widths) + 1}.0.conv1.weight has shape {first}, not "
                "(width, in_channels, 1, 1)"
            )
        widths.append(first[0])
        depths.append(len(blocks))
    if not widths:
        raise ValueError("the ResNet has no stages (backbone.layer1.*)")
    return ResNetArchitecture(stem[0], tuple(widths), tuple(depths))


def _name(a: ResNetArchitecture) -> str | None:
    for name, spec in RESNET_ARCHS.items():
        sizes = (spec["stem_width"], tuple(spec["widths"]), tuple(spec["depths"]))
        if sizes == (a.stem_width, a.widths, a.depths):
            return name
    return None


def describe(a: ResNetArchitecture) -> str:
    text = _name(a) or "a ResNet"
    return (
        f"{text} (stem {a.stem_width}, widths {a.widths}, depths {a.depths}, feature dim "
        f"{a.embed_dim})"
    )


def settings_for(a: ResNetArchitecture) -> dict[str, Any]:
    """Config settings building `a`: torchvision's ResNet has no stochastic depth, and the
    config refuses a drop-path rate for it."""
    name = _name(a)
    out: dict[str, Any] = {"model.arch": name} if name else {
        "model.arch": "resnet",
        "model.resnet_stem_width": a.stem_width,
        "model.resnet_widths": a.widths,
        "model.resnet_depths": a.depths,
    }  # fmt: skip
    out["model.drop_path_rate"] = 0.0
    return out

"""The backbones DINO trains, by the official names of `main_dino.py --arch`.

Three families share one calling convention, `backbone(x, *, train, use_running_average)`
returning an output whose `feature` is the (B, D) image feature: the ViT of the official
vision_transformer.py, torchvision's ResNet (v1.5, Bottleneck) and XCiT (facebookresearch/
xcit's xcit.py, loaded by main_dino.py through torch.hub). Each family also has a name whose
sizes come from the config: "custom" (ViT), "resnet", "xcit"; DINOv2's ViT (registers,
LayerScale, SwiGLU; dinov2/models/vision_transformer.py) is a fourth family.
"""

from __future__ import annotations

from typing import Any

from dino_jax.models.resnet import ResNet
from dino_jax.models.vit import ARCHS as VIT_ARCHS
from dino_jax.models.vit import VisionTransformer
from dino_jax.models.vit2 import DINOV2_ARCHS as _DINOV2_SIZES
from dino_jax.models.vit2 import DinoVisionTransformer
from dino_jax.models.xcit import XCIT_ARCHS, XCiT

# torchvision.models.resnet50: stem 64, bottleneck widths 64 * 2**i, (3, 4, 6, 3) blocks.
RESNET_ARCHS: dict[str, dict[str, Any]] = {
    "resnet50": {"stem_width": 64, "widths": (64, 128, 256, 512), "depths": (3, 4, 6, 3)},
}

# arch = "xcit": layer scale starting at 1 and the final norm over all tokens, as xcit_small_*.
# The named XCiTs are xcit.py's fourteen (main_dino.py accepts any model of that hub).
CUSTOM_XCIT = {"eta": 1.0, "tokens_norm": True}

# DINOv2's ViTs by their torch.hub names (dinov2/hub/backbones.py: patch 14); the options
# (registers, LayerScale, SwiGLU, interpolation) come from config.model.
DINOV2_ARCHS: dict[str, dict[str, Any]] = {
    f"dinov2_vit{name[4]}14": {"patch_size": 14, **spec} for name, spec in _DINOV2_SIZES.items()
}
DINOV2_OPTIONS = {  # config.model key: (default, DinoVisionTransformer field)
    "num_register_tokens": (0, "num_register_tokens"),
    "layerscale_init": (0.0, "init_values"),
    "ffn": ("mlp", "ffn"),
    "interpolate_offset": (0.1, "interpolate_offset"),
    "interpolate_antialias": (False, "interpolate_antialias"),
}

VIT_NAMES = (*VIT_ARCHS, "custom")
DINOV2_NAMES = (*DINOV2_ARCHS, "dinov2")
RESNET_NAMES = (*RESNET_ARCHS, "resnet")
XCIT_NAMES = (*XCIT_ARCHS, "xcit")
ARCH_NAMES = (*VIT_NAMES, *DINOV2_NAMES, *RESNET_NAMES, *XCIT_NAMES)
FAMILIES = {"vit": VIT_NAMES, "dinov2": DINOV2_NAMES, "resnet": RESNET_NAMES, "xcit": XCIT_NAMES}


def family(arch: str) -> str:
    """ "vit", "dinov2", "resnet" or "xcit"; ValueError for a name that is none of them."""
    for name, names in FAMILIES.items():
        if arch in names:
            return name
    raise ValueError(f"model.arch={arch!r} is not a known architecture; use one of {ARCH_NAMES}")


def dinov2_sizes(m) -> dict[str, Any]:
    """The DinoVisionTransformer fields of a DINOv2 `config.model`: its sizes (a hub name's
    or embed_dim / depth / num_heads / patch_size) and its options."""
    options = {field: m[key] for key, (_, field) in DINOV2_OPTIONS.items()}
    options["init_values"] = options["init_values"] or None  # 0: no LayerScale
    if m.arch in DINOV2_ARCHS:
        return {**options, **DINOV2_ARCHS[m.arch]}
    sizes = {"embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads}
    return {**options, "patch_size": m.patch_size, **sizes}


def resnet_sizes(m) -> dict[str, Any]:
    """stem_width, widths, depths of a ResNet `config.model`."""
    if m.arch in RESNET_ARCHS:
        return dict(RESNET_ARCHS[m.arch])
    return {
        "stem_width": m.resnet_stem_width,
        "widths": tuple(m.resnet_widths),
        "depths": tuple(m.resnet_depths),
    }


def xcit_sizes(m) -> dict[str, Any]:
    """patch_size, embed_dim, depth, num_heads, eta, tokens_norm of an XCiT `config.model`."""
    if m.arch in XCIT_ARCHS:
        return dict(XCIT_ARCHS[m.arch])
    return {
        "patch_size": m.patch_size,
        "embed_dim": m.embed_dim,
        "depth": m.depth,
        "num_heads": m.num_heads,
        **CUSTOM_XCIT,
    }


def vit_sizes(m) -> dict[str, Any]:
    """embed_dim, depth, num_heads of a ViT `config.model`."""
    if m.arch == "custom":
        return {"embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads}
    return dict(VIT_ARCHS[m.arch])


def build_backbone(m, *, img_size: int, dtype, param_dtype, attention_impl=None):
    """The backbone of a validated `config.model`. `img_size` (the global crop size) fixes
    the ViT's stored position grid; the others take any input size."""
    kind = family(m.arch)
    layers = {"dtype": dtype, "param_dtype": param_dtype}
    if kind == "resnet":
        return ResNet(**resnet_sizes(m), **layers)
    if kind == "xcit":
        return XCiT(drop_path_rate=m.drop_path_rate, **xcit_sizes(m), **layers)
    if kind == "dinov2":
        return DinoVisionTransformer(
            img_size=img_size,
            drop_path_rate=m.drop_path_rate,
            attention_impl=attention_impl,
            **dinov2_sizes(m),
            **layers,
        )
    return VisionTransformer(
        patch_size=m.patch_size,
        img_size=img_size,
        drop_path_rate=m.drop_path_rate,
        attention_impl=attention_impl,
        **vit_sizes(m),
        **layers,
    )


def is_vit(backbone) -> bool:
    """Whether a built backbone is a ViT, DINO's or DINOv2's (intermediate blocks, patch grid)."""
    return isinstance(backbone, (VisionTransformer, DinoVisionTransformer))


def has_attention_maps(backbone) -> bool:
    """Whether a built backbone returns its last block's attention (DINO's ViT)."""
    return isinstance(backbone, VisionTransformer)


def size_multiple(backbone) -> int:
    """What each input side must be a multiple of: a ViT's patch size, else 1."""
    return backbone.patch_size if is_vit(backbone) else 1


def vit_depth(backbone) -> int | None:
    """A ViT's number of blocks (the linear probe's n_last_blocks bound); None otherwise."""
    return backbone.depth if is_vit(backbone) else None

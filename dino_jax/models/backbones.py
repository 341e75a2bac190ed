"""The backbones DINO trains, by the official names of `main_dino.py --arch`.

Three families share one calling convention, `backbone(x, *, train, use_running_average)`
returning an output whose `feature` is the (B, D) image feature: the ViT of the official
vision_transformer.py, torchvision's ResNet (v1.5, Bottleneck) and XCiT (facebookresearch/
xcit's xcit.py, loaded by main_dino.py through torch.hub). Each family also has a name whose
sizes come from the config: "custom" (ViT), "resnet", "xcit"; DINOv2's ViT (registers,
LayerScale, SwiGLU; dinov2/models/vision_transformer.py) is a fourth family, "dinov2", and
DINOv3's (RoPE instead of a learned position embedding, storage tokens, LayerScale, SwiGLU;
dinov3/models/vision_transformer.py) a fifth, "dinov3".
"""

from __future__ import annotations

from typing import Any

from dino_jax.models.resnet import ResNet
from dino_jax.models.vit import ARCHS as VIT_ARCHS
from dino_jax.models.vit import VisionTransformer
from dino_jax.models.vit2 import DINOV2_ARCHS as _DINOV2_SIZES
from dino_jax.models.vit2 import DinoVisionTransformer
from dino_jax.models.vit3 import ARCHS as _DINOV3_SIZES
from dino_jax.models.vit3 import VisionTransformer3
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

# DINOv3's ViTs by their torch.hub names (dinov3/hub/backbones.py: patch 16). The names fix
# the sizes only; storage tokens, LayerScale, feed-forward and RoPE come from config.model.
DINOV3_ARCHS: dict[str, dict[str, Any]] = {
    f"dinov3_vit{name[4]}16": {"patch_size": 16, **_DINOV3_SIZES[name]}
    for name in ("vit_small", "vit_base", "vit_large")
}
# config.model key: (default, VisionTransformer3 field). The first three are shared with
# DINOv2's ViT (DINOV2_OPTIONS), the RoPE ones are DINOv3's alone.
DINOV3_OPTIONS = {
    "num_register_tokens": (0, "n_storage_tokens"),
    "layerscale_init": (0.0, "layerscale_init"),
    "ffn": ("mlp", "ffn_layer"),
}
ROPE_OPTIONS = {
    "rope_base": (100.0, "rope_base"),
    "rope_min_period": (None, "rope_min_period"),
    "rope_max_period": (None, "rope_max_period"),
    "rope_normalize_coords": ("separate", "rope_normalize_coords"),
    "rope_shift_coords": (None, "rope_shift_coords"),
    "rope_jitter_coords": (None, "rope_jitter_coords"),
    "rope_rescale_coords": (None, "rope_rescale_coords"),
    "rope_dtype": ("fp32", "rope_dtype"),
}

VIT_NAMES = (*VIT_ARCHS, "custom")
DINOV2_NAMES = (*DINOV2_ARCHS, "dinov2")
DINOV3_NAMES = (*DINOV3_ARCHS, "dinov3")
RESNET_NAMES = (*RESNET_ARCHS, "resnet")
XCIT_NAMES = (*XCIT_ARCHS, "xcit")
ARCH_NAMES = (*VIT_NAMES, *DINOV2_NAMES, *DINOV3_NAMES, *RESNET_NAMES, *XCIT_NAMES)
FAMILIES = {
    "vit": VIT_NAMES,
    "dinov2": DINOV2_NAMES,
    "dinov3": DINOV3_NAMES,
    "resnet": RESNET_NAMES,
    "xcit": XCIT_NAMES,
}
# The families whose backbone is a ViT: patch grid, intermediate blocks (linear probe)
VIT_FAMILIES = ("vit", "dinov2", "dinov3")


def family(arch: str) -> str:
    """ "vit", "dinov2", "dinov3", "resnet" or "xcit"; ValueError for a name that is none."""
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


def dinov3_sizes(m) -> dict[str, Any]:
    """The VisionTransformer3 fields of a DINOv3 `config.model`: its sizes (a hub name's or
    embed_dim / depth / num_heads / patch_size), storage tokens, LayerScale, feed-forward and
    RoPE. Both RoPE periods set: they parametrise the periods, rope_base is unused (None)."""
    keys = {**DINOV3_OPTIONS, **ROPE_OPTIONS}
    options = {field: m[key] for key, (_, field) in keys.items()}
    options["layerscale_init"] = options["layerscale_init"] or None  # 0: no LayerScale
    if m.rope_min_period is not None and m.rope_max_period is not None:
        options["rope_base"] = None
    if m.arch in DINOV3_ARCHS:
        return {**options, **DINOV3_ARCHS[m.arch]}
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


def build_backbone(
    m, *, img_size: int, dtype, param_dtype, attention_impl=None, attention_pad: int = 0
):
    """The backbone of a validated `config.model`. `img_size` (the global crop size) fixes
    the stored position grid of DINO's and DINOv2's ViTs; the others take any input size.
    `attention_impl` and `attention_pad` choose the ViTs' attention kernel and its token
    padding (recipe.attention_implementation, model.attention_pad): the same attention either
    way. model.gelu sets the transformers' GELU and model.remat the ViT blocks' activation
    checkpointing (validation refuses them where a family has no such thing).

    DINOv3's ViT uses model.drop_path_rate in every block, as the official
    DinoVisionTransformer does, where DINO's ViT ramps it up linearly over the blocks."""
    kind = family(m.arch)
    layers = {"dtype": dtype, "param_dtype": param_dtype}
    if kind == "resnet":
        return ResNet(**resnet_sizes(m), **layers)
    if kind == "xcit":
        return XCiT(drop_path_rate=m.drop_path_rate, gelu=m.gelu, **xcit_sizes(m), **layers)
    vit = {
        "drop_path_rate": m.drop_path_rate,
        "attention_impl": attention_impl,
        "attention_pad": attention_pad,
        "gelu": m.gelu,
        "remat": m.remat,
    }
    if kind == "dinov2":
        return DinoVisionTransformer(img_size=img_size, **vit, **dinov2_sizes(m), **layers)
    if kind == "dinov3":
        return VisionTransformer3(**vit, **dinov3_sizes(m), **layers)
    return VisionTransformer(
        patch_size=m.patch_size, img_size=img_size, **vit, **vit_sizes(m), **layers
    )


def is_vit(backbone) -> bool:
    """Whether a built backbone is a ViT, DINO's, DINOv2's or DINOv3's (a patch grid, and
    `n_last_blocks` intermediate outputs without registers / storage tokens)."""
    return isinstance(backbone, (VisionTransformer, DinoVisionTransformer, VisionTransformer3))


def has_attention_maps(backbone) -> bool:
    """Whether a built backbone returns its last block's attention (DINO's ViT only: DINOv2's
    and DINOv3's return none)."""
    return isinstance(backbone, VisionTransformer)


def size_multiple(backbone) -> int:
    """What each input side must be a multiple of: a ViT's patch size, else 1."""
    return backbone.patch_size if is_vit(backbone) else 1


def vit_depth(backbone) -> int | None:
    """A ViT's number of blocks (the linear probe's n_last_blocks bound); None otherwise."""
    return backbone.depth if is_vit(backbone) else None

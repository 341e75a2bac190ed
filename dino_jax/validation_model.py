"""Validation of `config.model` and of the optimiser choice: the architecture family, the
settings each family reads (and refuses when they would be ignored), the dtypes."""

from __future__ import annotations

import ml_collections

from dino_jax.config import closest_key
from dino_jax.models.backbones import (
    ARCH_NAMES,
    DINOV2_ARCHS,
    DINOV2_OPTIONS,
    DINOV3_ARCHS,
    DINOV3_OPTIONS,
    RESNET_ARCHS,
    ROPE_OPTIONS,
    VIT_ARCHS,
    VIT_FAMILIES,
    XCIT_ARCHS,
    family,
)
from dino_jax.models.rope import NORMALIZE_COORDS
from dino_jax.models.vit2 import FFNS
from dino_jax.models.vit3_layers import SWIGLU_ALIGN
from dino_jax.optim import OPTIMIZERS
from dino_jax.validation_base import Errors
from dino_jax.validation_speed import speed_option_errors

DTYPES = ("float32", "bfloat16")
RESNET_KEYS = ("resnet_stem_width", "resnet_widths", "resnet_depths")
SIZE_KEYS = ("embed_dim", "depth", "num_heads")
# DINOv3's ffn_layer names (dinov3/models/vision_transformer.py); its "swiglu" is the layer of
# DINOv2's "swiglufused" (hidden 2/3 of the MLP's, a multiple of 8), with w1 / w2 apart
DINOV3_FFNS = ("mlp", *SWIGLU_ALIGN)
ROPE_DTYPES = ("fp32", "bf16")  # the official pos_embed_rope_dtype; fp16 refused as compute
SHARED_OPTIONS = tuple(DINOV3_OPTIONS)  # options DINOv2's and DINOv3's ViTs both have


# The transformer speed options and their defaults (today's behaviour)
def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _unset_unless(e: Errors, m, keys, arch_kind: str, needed_for: str) -> None:
    for key in keys:
        e.check(
            m[key] is None,
            f"model.{key}={m[key]!r} is only read with model.arch={needed_for} (this is the"
            f" {arch_kind} model.arch={m.arch!r}): leave model.{key} unset",
        )


def _named_sizes(e: Errors, m, spec: dict, custom: str, with_patch: bool = False) -> None:
    """A named architecture has its own sizes: a different one would be ignored silently;
    `with_patch`: the name fixes the patch size too (it must then be model.patch_size)."""
    for key in SIZE_KEYS:
        e.check(
            m[key] is None or m[key] == spec[key],
            f"model.{key}={m[key]!r} is only read with model.arch='{custom}' ({m.arch} has"
            f" {key} {spec[key]}): set model.arch={custom}, or leave model.{key} unset",
        )
    if with_patch:
        e.check(
            m.patch_size == spec["patch_size"],
            f"model.patch_size={m.patch_size!r} but {m.arch} has patch size"
            f" {spec['patch_size']}: set model.patch_size={spec['patch_size']}",
        )


def _custom_sizes(e: Errors, m, custom: str) -> None:
    for key in SIZE_KEYS:
        e.check(
            _positive_int(m[key]),
            f"model.{key}={m[key]!r}: a positive int is needed with arch='{custom}'",
        )
    if _positive_int(m.embed_dim) and _positive_int(m.num_heads):
        e.check(
            m.embed_dim % m.num_heads == 0,
            f"model.embed_dim={m.embed_dim} is not divisible by num_heads={m.num_heads}",
        )


def _vit_errors(e: Errors, m) -> None:
    if m.arch in VIT_ARCHS:
        _named_sizes(e, m, VIT_ARCHS[m.arch], "custom")
    else:
        _custom_sizes(e, m, "custom")
    _unset_unless(e, m, RESNET_KEYS, "ViT", "resnet")


def _xcit_errors(e: Errors, m) -> None:
    if m.arch in XCIT_ARCHS:
        _named_sizes(e, m, XCIT_ARCHS[m.arch], "xcit", with_patch=True)
    else:
        _custom_sizes(e, m, "xcit")
        e.check(
            m.patch_size in (8, 16),
            f"model.patch_size={m.patch_size!r}: XCiT's convolutional patch embedding exists"
            " for patch sizes 8 and 16 only",
        )
    _unset_unless(e, m, RESNET_KEYS, "XCiT", "resnet")


def _registers_and_layerscale(e: Errors, m, registers: str, layerscale: str) -> None:
    """The options DINOv2's and DINOv3's ViTs share; `registers`, `layerscale`: where the
    official values (4 tokens, 1e-5) are used."""
    r = m.num_register_tokens
    e.check(
        isinstance(r, int) and not isinstance(r, bool) and r >= 0,
        f"model.num_register_tokens={r!r}: an int >= 0 ({registers}: 4)",
    )
    e.check(
        m.layerscale_init >= 0.0,
        f"model.layerscale_init={m.layerscale_init}: >= 0 ({layerscale}: 1e-5; 0: off)",
    )


def _dinov2_errors(e: Errors, m) -> None:
    if m.arch in DINOV2_ARCHS:
        _named_sizes(e, m, DINOV2_ARCHS[m.arch], "dinov2", with_patch=True)
    else:
        _custom_sizes(e, m, "dinov2")
    _unset_unless(e, m, RESNET_KEYS, "DINOv2 ViT", "resnet")
    _registers_and_layerscale(e, m, "DINOv2's *_reg models", "DINOv2 training")
    hint = " (DINOv3's swiglu is this swiglufused)" if m.ffn in SWIGLU_ALIGN else ""
    e.check(m.ffn in FFNS, f"model.ffn={m.ffn!r}: use one of {', '.join(FFNS)}{hint}")
    e.check(
        m.interpolate_offset >= 0.0,
        f"model.interpolate_offset={m.interpolate_offset}: >= 0 (DINOv2: 0.1; *_reg: 0)",
    )


def _dinov3_errors(e: Errors, m) -> None:
    if m.arch in DINOV3_ARCHS:
        _named_sizes(e, m, DINOV3_ARCHS[m.arch], "dinov3", with_patch=True)
    else:
        _custom_sizes(e, m, "dinov3")
    d, h = m.embed_dim, m.num_heads
    if m.arch == "dinov3" and _positive_int(d) and _positive_int(h) and d % h == 0:
        e.check(
            (d // h) % 4 == 0,
            f"model.embed_dim={d} / model.num_heads={h} = {d // h} per head: DINOv3's RoPE"
            " rotates each head's features in groups of 4 (row and column angles, sin and cos),"
            " so it needs a multiple of 4: change embed_dim or num_heads",
        )
    _unset_unless(e, m, RESNET_KEYS, "DINOv3 ViT", "resnet")
    _registers_and_layerscale(e, m, "DINOv3's recipes", "DINOv3's recipes")
    hint = " (DINOv2's swiglufused is DINOv3's swiglu)" if m.ffn in FFNS else ""
    e.check(
        m.ffn in DINOV3_FFNS,
        f"model.ffn={m.ffn!r}: use one of {', '.join(DINOV3_FFNS)} (DINOv3's ffn_layer){hint}",
    )
    for key in ("interpolate_offset", "interpolate_antialias"):
        default = DINOV2_OPTIONS[key][0]
        e.check(
            m[key] == default,
            f"model.{key}={m[key]!r} sets DINOv2's position-embedding resize; DINOv3's ViT"
            f" (model.arch={m.arch!r}) has no position embedding to resize (RoPE takes any"
            f" patch grid): leave model.{key}={default!r}",
        )
    _rope_errors(e, m)


def _rope_errors(e: Errors, m) -> None:
    """DINOv3's RopePositionEmbedding settings (dinov3/layers/rope_position_encoding.py)."""
    low, high = m.rope_min_period, m.rope_max_period
    e.check(
        (low is None) == (high is None),
        f"model.rope_min_period={low!r}, model.rope_max_period={high!r}: the log-spaced RoPE"
        " periods need both; set both, or neither (periods from model.rope_base)",
    )
    base_default = ROPE_OPTIONS["rope_base"][0]
    e.check(
        low is None or high is None or m.rope_base == base_default,
        f"model.rope_base={m.rope_base} with model.rope_min_period / rope_max_period: two"
        " parametrisations of the RoPE periods (the official RopePositionEmbedding refuses"
        " both); set, the two periods give them and rope_base is unused: leave"
        f" model.rope_base={base_default}, or unset the periods",
    )
    e.check(m.rope_base > 0, f"model.rope_base={m.rope_base}: must be > 0 (DINOv3: 100)")
    for key in ("rope_min_period", "rope_max_period", "rope_shift_coords"):
        e.check(
            m[key] is None or m[key] > 0,
            f"model.{key}={m[key]}: must be > 0 (or unset: None)",
        )
    if low is not None and high is not None and low > 0:
        e.check(
            low <= high,
            f"model.rope_min_period={low} > model.rope_max_period={high}: swap them",
        )
    for key in ("rope_jitter_coords", "rope_rescale_coords"):
        e.check(
            m[key] is None or m[key] >= 1,
            f"model.{key}={m[key]}: a factor >= 1, drawn log-uniformly in [1/x, x] (DINOv3's"
            " ViT-L and ViT-7B: rope_rescale_coords=2), or unset (None)",
        )
    e.check(
        m.rope_normalize_coords in NORMALIZE_COORDS,
        f"model.rope_normalize_coords={m.rope_normalize_coords!r}: use one of"
        f" {', '.join(NORMALIZE_COORDS)}",
    )
    e.check(
        m.rope_dtype in ROPE_DTYPES,
        f"model.rope_dtype={m.rope_dtype!r}: use one of {', '.join(ROPE_DTYPES)} (DINOv3's"
        " pos_embed_rope_dtype; ViT-L recipe: bf16, ViT-7B and the hub models: fp32)",
    )


def _dinov2_options_unset(e: Errors, m, kind: str) -> None:
    """Registers, LayerScale, SwiGLU and DINOv2's resize exist in DINOv2's ViT only (the
    first three in DINOv3's too)."""
    for key, (default, _) in DINOV2_OPTIONS.items():
        also = "; DINOv3's ViT, model.arch=dinov3, has it too" if key in SHARED_OPTIONS else ""
        e.check(
            m[key] == default,
            f"model.{key}={m[key]!r} is a DINOv2 ViT option; the {kind} model.arch={m.arch!r}"
            f" has no such thing: set model.arch=dinov2 (or dinov2_vits14, ...{also}), or"
            f" leave model.{key}={default!r}",
        )


def _rope_options_unset(e: Errors, m, kind: str) -> None:
    """The RoPE settings exist in DINOv3's ViT only."""
    for key, (default, _) in ROPE_OPTIONS.items():
        e.check(
            m[key] == default,
            f"model.{key}={m[key]!r} is a DINOv3 ViT option (its rotary position embedding);"
            f" the {kind} model.arch={m.arch!r} has no RoPE: set model.arch=dinov3 (or"
            f" dinov3_vits16, ...), or leave model.{key}={default!r}",
        )


def _resnet_errors(e: Errors, m) -> None:
    for key in SIZE_KEYS:
        e.check(
            m[key] is None,
            f"model.{key}={m[key]!r} is a transformer setting; a ResNet reads"
            f" model.resnet_stem_width / resnet_widths / resnet_depths: leave model.{key} unset",
        )
    e.check(
        m.drop_path_rate == 0.0,
        f"model.drop_path_rate={m.drop_path_rate}: torchvision's ResNet has no stochastic"
        " depth (main_dino.py does not pass it to a ResNet): set model.drop_path_rate=0",
    )
    if m.arch in RESNET_ARCHS:
        for key in RESNET_KEYS:
            e.check(
                m[key] is None,
                f"model.{key}={m[key]!r} is only read with model.arch='resnet' ({m.arch} has"
                " its own sizes): set model.arch=resnet, or leave it unset",
            )
        return
    e.check(
        _positive_int(m.resnet_stem_width),
        f"model.resnet_stem_width={m.resnet_stem_width!r}: a positive int is needed with"
        " arch='resnet' (ResNet-50: 64)",
    )
    for key, example in (
        ("resnet_widths", "(64, 128, 256, 512)"),
        ("resnet_depths", "(3, 4, 6, 3)"),
    ):
        value = m[key]
        e.check(
            isinstance(value, tuple) and len(value) == 4 and all(_positive_int(v) for v in value),
            f"model.{key}={value!r}: four positive ints are needed with arch='resnet'"
            f" (ResNet-50: {example})",
        )


def model_errors(m: ml_collections.ConfigDict, platform: str | None = None) -> list[str]:
    e = Errors()
    try:
        kind = family(m.arch)
    except ValueError:
        close = closest_key(str(m.arch), ARCH_NAMES)
        hint = f" (did you mean {close}?)" if close else ""
        e.append(
            f"model.arch={m.arch!r} is not an architecture{hint}: use one of"
            f" {', '.join(ARCH_NAMES)}"
        )
        kind = None
    if kind == "vit":
        _vit_errors(e, m)
    elif kind == "dinov2":
        _dinov2_errors(e, m)
    elif kind == "dinov3":
        _dinov3_errors(e, m)
    elif kind == "xcit":
        _xcit_errors(e, m)
    elif kind == "resnet":
        _resnet_errors(e, m)
    names = {"vit": "ViT", "dinov2": "DINOv2 ViT", "xcit": "XCiT", "resnet": "ResNet"}
    if kind in ("vit", "xcit", "resnet"):
        _dinov2_options_unset(e, m, names[kind])
    if kind in names:
        _rope_options_unset(e, m, names[kind])
    e.extend(speed_option_errors(m, kind))
    for key in ("patch_size", "out_dim", "head_nlayers", "head_hidden_dim", "head_bottleneck_dim"):
        e.check(_positive_int(m[key]), f"model.{key}={m[key]!r}: must be a positive int")
    e.check(0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate={m.drop_path_rate}: use [0, 1)")
    e.check(
        m.compute_dtype != "float16",
        "model.compute_dtype='float16' is refused: float16 needs dynamic loss scaling, which"
        " dino_jax does not do; use 'bfloat16' (float32's exponent range, so no scaling, at the"
        " same matmul speed on A100/H100/H200 and TPUs) or 'float32'",
    )
    e.check(
        m.param_dtype != "float16",
        "model.param_dtype='float16' is refused: keep the parameters in 'float32' (or"
        " 'bfloat16'); compute in bfloat16 with model.compute_dtype",
    )
    for key in ("compute_dtype", "param_dtype"):
        e.check(m[key] in (*DTYPES, "float16"), f"model.{key}={m[key]!r}: use one of {DTYPES}")
    e.check(
        m.attention in ("auto", "xla", "cudnn"),
        f"model.attention={m.attention!r}: use auto, xla or cudnn",
    )
    if m.attention == "cudnn":
        e.check(
            kind in VIT_FAMILIES,
            f"model.attention='cudnn' is a ViT setting ({m.arch} has no such attention): use auto",
        )
        e.check(
            platform in (None, "gpu"),
            f"model.attention='cudnn' needs an NVIDIA GPU (this run is on {platform}): use auto",
        )
        e.check(
            m.compute_dtype == "bfloat16",
            f"model.attention='cudnn' needs model.compute_dtype bfloat16, not"
            f" {m.compute_dtype!r}: change one of them",
        )
    return e


def optimizer_errors(o: ml_collections.ConfigDict) -> list[str]:
    """main_dino.py --optimizer: adamw (default), sgd or lars (a positive optim.lr is
    checked with the other optim values, for every optimiser)."""
    e = Errors()
    e.check(
        o.optimizer in OPTIMIZERS,
        f"optim.optimizer={o.optimizer!r}: use one of {', '.join(OPTIMIZERS)}",
    )
    return e


def backbone_use_errors(c: ml_collections.ConfigDict) -> list[str]:
    """Settings elsewhere that only a ViT backbone can serve."""
    e = Errors()
    try:
        kind = family(c.model.arch)
    except ValueError:
        return e  # reported by model_errors
    if kind != "vit":
        e.check(
            not c.eval.attention_images,
            f"eval.attention_images={c.eval.attention_images}: attention maps are DINO's ViT's (its"
            f" last block's CLS self-attention); model.arch={c.model.arch!r} gives none: set"
            " eval.attention_images=0",
        )
    return e


def input_multiple(m: ml_collections.ConfigDict) -> int:
    """What every input side must be a multiple of: a ViT's patch size; 1 for a ResNet or an
    XCiT, whose strided convolutions take any size."""
    try:
        return m.patch_size if family(m.arch) in VIT_FAMILIES else 1
    except ValueError:
        return m.patch_size

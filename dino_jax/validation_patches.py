"""Validation of the patch-level objectives: iBOT's masked-patch loss (dino.ibot_*) and DINOv3's
Gram anchoring (dino.gram_*), alone and against the backbone, head and batch they need."""

from __future__ import annotations

import ml_collections

from dino_jax.models.backbones import family
from dino_jax.validation_base import Errors

# Backbone families whose network gives patch tokens, and those with a mask token for iBOT.
PATCH_FAMILIES = ("vit", "dinov2", "dinov3", "xcit")
MASK_TOKEN_FAMILIES = ("dinov2", "dinov3")
GRAM_TOKENS = ("all", "masked", "unmasked")


def _family(arch) -> str | None:
    try:
        return family(arch)
    except ValueError:
        return None  # reported by the model's own checks


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _chunks_split(e: Errors, name: str, chunks, batch) -> None:
    e.positive_int(name, chunks)
    if _is_int(chunks) and chunks > 0 and _is_int(batch) and batch > 0:
        e.check(
            batch % chunks == 0,
            f"{name}={chunks} does not split optim.batch_size={batch} into equal chunks: use a"
            " divisor of the batch size",
        )


def ibot_errors(c: ml_collections.ConfigDict, num_processes: int) -> list[str]:
    e = Errors()
    d, m = c.dino, c.model
    e.check(
        d.ibot_weight >= 0.0,
        f"dino.ibot_weight={d.ibot_weight}: a weight >= 0 (DINOv2: 1.0; 0 turns iBOT off)",
    )
    ratio = d.ibot_mask_ratio
    e.check(
        isinstance(ratio, tuple) and len(ratio) == 2 and 0.0 <= ratio[0] <= ratio[1] <= 1.0,
        f"dino.ibot_mask_ratio={ratio!r}: a (low, high) pair with 0 <= low <= high <= 1"
        " (DINOv2: (0.1, 0.5))",
    )
    e.check(
        0.0 <= d.ibot_mask_probability <= 1.0,
        f"dino.ibot_mask_probability={d.ibot_mask_probability}: use [0, 1] (DINOv2: 0.5)",
    )
    e.check(
        _is_int(d.ibot_out_dim) and d.ibot_out_dim >= 0,
        f"dino.ibot_out_dim={d.ibot_out_dim!r}: an int >= 0 (0: model.out_dim)",
    )
    if not d.ibot_weight:
        return e
    if d.ibot_out_dim and not d.ibot_separate_head:
        e.append(
            f"dino.ibot_out_dim={d.ibot_out_dim} sizes a separate patch head, but"
            " dino.ibot_separate_head is False (the patches share the DINO head and its"
            " model.out_dim): set dino.ibot_separate_head=True or dino.ibot_out_dim=0"
        )
    kind = _family(m.arch)
    if kind == "resnet":
        e.append(
            f"dino.ibot_weight={d.ibot_weight}: iBOT predicts masked patch tokens, and"
            f" {m.arch} has no patch tokens: use a DINOv2 or DINOv3 ViT (model.arch=dinov2,"
            " dinov2_vits14, dinov3, ...) or set dino.ibot_weight=0"
        )
    elif kind is not None and kind not in MASK_TOKEN_FAMILIES:
        e.append(
            f"dino.ibot_weight={d.ibot_weight}: iBOT replaces masked patches by a learned mask"
            f" token, and {m.arch} has none: use a DINOv2 or DINOv3 ViT (model.arch=dinov2,"
            " dinov2_vits14, dinov3, ...) or set dino.ibot_weight=0"
        )
    e.check(
        not m.use_bn_in_head,
        "dino.ibot_weight > 0 with model.use_bn_in_head=True: the head's BatchNorm would"
        " normalise patch tokens with the CLS tokens' statistics (DINOv2's heads have none):"
        " set model.use_bn_in_head=False",
    )
    _chunks_split(e, "dino.ibot_chunks", d.ibot_chunks, c.optim.batch_size)
    chunks, batch = d.ibot_chunks, c.optim.batch_size
    if _is_int(chunks) and chunks > 0 and _is_int(batch) and batch % chunks == 0:
        e.check(
            chunks % num_processes == 0,
            f"dino.ibot_chunks={chunks}: each of the {num_processes} processes draws the masks"
            " of its own chunks, so use a multiple of the process count",
        )
        masked_crops = int(2 * (batch // chunks) * d.ibot_mask_probability)
        e.check(
            masked_crops > 0,
            f"dino.ibot_mask_probability={d.ibot_mask_probability} masks no crop of a chunk of"
            f" {batch // chunks} images (2 global crops each): raise it, use fewer"
            " dino.ibot_chunks, or set dino.ibot_weight=0",
        )
    return e


def gram_errors(c: ml_collections.ConfigDict) -> list[str]:
    e = Errors()
    d, m = c.dino, c.model
    e.check(
        d.gram_weight >= 0.0,
        f"dino.gram_weight={d.gram_weight}: a weight >= 0 (0 turns Gram anchoring off)",
    )
    for key in ("gram_start_step", "gram_update_every"):
        e.check(
            _is_int(d[key]) and d[key] >= 0,
            f"dino.{key}={d[key]!r}: a step count, an int >= 0",
        )
    e.check(
        d.gram_tokens in GRAM_TOKENS,
        f"dino.gram_tokens={d.gram_tokens!r}: use one of {', '.join(GRAM_TOKENS)}",
    )
    e.check(
        not (d.gram_remove_neg and d.gram_remove_only_teacher_neg),
        "dino.gram_remove_neg and dino.gram_remove_only_teacher_neg exclude each other: set"
        " one of them",
    )
    if not d.gram_weight:
        return e
    kind = _family(m.arch)
    if kind is not None and kind not in PATCH_FAMILIES:
        e.append(
            f"dino.gram_weight={d.gram_weight}: Gram anchoring compares patch-token"
            f" similarities, and {m.arch} has no patch tokens: use a ViT or XCiT, or set"
            " dino.gram_weight=0"
        )
    if d.gram_tokens != "all" and not d.ibot_weight:
        e.append(
            f"dino.gram_tokens={d.gram_tokens!r} selects patches by the iBOT masks, but iBOT"
            " is off (dino.ibot_weight=0): use gram_tokens='all' or turn iBOT on"
        )
    if d.gram_img_level:
        e.check(
            d.gram_tokens == "all",
            f"dino.gram_tokens={d.gram_tokens!r} with dino.gram_img_level=True: an image-level"
            " Gram uses every patch; use gram_tokens='all' or a batch-level Gram",
        )
        e.check(
            d.gram_chunks == 1,
            f"dino.gram_chunks={d.gram_chunks} with dino.gram_img_level=True: chunks split"
            " batch-level Grams only; leave gram_chunks=1",
        )
    else:
        _chunks_split(e, "dino.gram_chunks", d.gram_chunks, c.optim.batch_size)
    return e


def patch_objective_errors(c: ml_collections.ConfigDict, num_processes: int) -> list[str]:
    """Every problem of the iBOT and Gram settings of `c`."""
    return [*ibot_errors(c, num_processes), *gram_errors(c)]

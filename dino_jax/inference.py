"""Features of a frozen backbone for notebooks and scripts: `preprocess` then `features`.

`preprocess` is the evaluation transform of the official eval_knn.py / eval_linear.py
(Resize(256, bicubic) of the shorter side, CenterCrop(224), ToTensor, Normalize(ImageNet mean,
std)), run by the very code the k-NN evaluation runs (dino_jax.evaluate.features.eval_transform
on the data pipeline's host canvas), so its output is the k-NN evaluation's input. `features`
applies any backbone of dino_jax.models.backbones, jit-compiled once per input shape, and
returns numpy arrays:

    model, variables = load_backbone("dino_deitsmall16_pretrain.pth")
    out = features(model, variables, preprocess(["a.jpg", "b.png"]))
    out.cls  # (2, 384)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dino_jax.config import default_config
from dino_jax.data import decode
from dino_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dino_jax.evaluate.features import eval_transform
from dino_jax.models.backbones import has_attention_maps, is_vit, size_multiple, vit_depth

# The data pipeline's host canvas: an image longer than this is downscaled once on the host
# before the device's resize and crop (docs/data.md), so the k-NN evaluation sees it so.
DEFAULT_CANVAS = default_config().data.canvas_size
# Without a fixed canvas, a batch's canvas is its largest image rounded up to this, so that
# photos of slightly different sizes share one compilation.
_CANVAS_STEP = 64

ImageLike = str | os.PathLike | np.ndarray | Image.Image


# ----------------------------------------------------------------------------- preprocess


def _rgb(image: Any, canvas_size: int | None) -> np.ndarray:
    """One input as uint8 (h, w, 3), downscaled to the canvas as the data pipeline does: a
    path decoded by the pipeline's own decoder (colour conversion, 16-bit greyscale, a big
    JPEG's reduced-scale decoding), a PIL image or a uint8 (h, w), (h, w, 1), (h, w, 3) or
    (h, w, 4) array."""
    if isinstance(image, (str, os.PathLike)):
        return _decode_file(os.fspath(image), canvas_size)
    if isinstance(image, Image.Image):
        return _fit(decode._to_rgb(image), canvas_size)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 (0..255, as decoded), got {array.dtype}: convert them, e.g."
            " np.clip(x * 255, 0, 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if array.ndim in (2, 3) and min(array.shape[:2]) < 1:
        raise ValueError(f"an empty image array of shape {array.shape}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return _fit(np.repeat(array[..., None], 3, axis=-1), canvas_size)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return _fit(np.ascontiguousarray(array[..., :3]), canvas_size)
    raise ValueError(
        f"an image array of shape {array.shape}: use (H, W, 3) RGB, (H, W) greyscale, or a"
        " batch (B, H, W, 3)"
    )


def _decode_file(path: str, canvas_size: int | None) -> np.ndarray:
    """decode.decode_image of a file, on a canvas its own size when `canvas_size` is None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if canvas_size is None:
            with Image.open(path) as header:
                canvas_size = max(header.size)
        return decode.decode_image(data, canvas_size)
    except decode.BadImage as err:
        raise ValueError(f"{path}: {err.reason}") from None
    except (OSError, Image.UnidentifiedImageError) as err:
        raise ValueError(f"{path}: cannot be read as an image ({err})") from None


def _fit(rgb: np.ndarray, canvas_size: int | None) -> np.ndarray:
    """The data pipeline's host downscale (decode.fit_size, PIL bicubic) to the canvas."""
    if canvas_size is None:
        return rgb
    height, width = decode.fit_size(*rgb.shape[:2], canvas_size)
    if (height, width) == rgb.shape[:2]:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC))


def _as_list(images: Any) -> list:
    """The inputs one by one: a path, PIL image or array alone, a (B, H, W, C) array, or a
    sequence of any of them."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images) if hasattr(images, "__iter__") else [images]


@functools.partial(jax.jit, static_argnames=("resize", "crop", "mean", "std"))
def _transform(canvases, sizes, *, resize, crop, mean, std):
    return eval_transform(
        canvases, sizes, resize=resize, crop=crop, mean=mean, std=std, dtype=jnp.float32
    )


def preprocess(
    images: ImageLike | Sequence[ImageLike],
    *,
    resize: int = 256,
    crop: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    canvas_size: int | None = DEFAULT_CANVAS,
    batch_size: int = 64,
) -> np.ndarray:
    """Images -> float32 (B, crop, crop, 3) NHWC, the official evaluation transform.

    `images`: one or a sequence of file paths, PIL images or uint8 arrays ((H, W, 3) RGB,
    (H, W) greyscale, RGBA with its alpha dropped), or a uint8 (B, H, W, 3) batch. Each is
    resized (PIL bicubic) so that its shorter side is `resize`, center-cropped to `crop`,
    scaled to [0, 1] and normalised with `mean` / `std` (ImageNet's by default, the eval
    scripts'; use WeightsInfo.mean / std for weights trained with others).

    `canvas_size`: as the k-NN evaluation's data pipeline (config.data.canvas_size), an image
    whose longer side exceeds it is first downscaled to it on the host, so that the output is
    exactly the evaluation's input; None resamples once from the full image. Computed on the
    default device `batch_size` images at a time (one compilation per canvas).
    """
    if not 1 <= crop <= resize:
        raise ValueError(f"resize={resize}, crop={crop}: need 1 <= crop <= resize")
    if canvas_size is not None and canvas_size < 1:
        raise ValueError(f"canvas_size={canvas_size}: a positive side in pixels, or None")
    rgbs = [_rgb(image, canvas_size) for image in _as_list(images)]
    if not rgbs:
        raise ValueError("no images given")
    settings = {"resize": resize, "crop": crop, "mean": tuple(mean), "std": tuple(std)}
    out = []
    for start in range(0, len(rgbs), batch_size):
        chunk = rgbs[start : start + batch_size]
        canvases, sizes = _canvases(chunk, canvas_size, batch_size if start else len(chunk))
        done = _transform(jnp.asarray(canvases), jnp.asarray(sizes), **settings)
        out.append(np.asarray(done)[: len(chunk)])
    return np.concatenate(out)


def _canvases(
    rgbs: list[np.ndarray], canvas_size: int | None, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, L, L, 3) zero-padded canvases (decode.to_canvas) and (rows, 2) sizes; rows past
    the images repeat the first (a full last chunk compiles no new shape)."""
    side = canvas_size
    if side is None:
        longest = max(max(r.shape[:2]) for r in rgbs)
        side = -(-longest // _CANVAS_STEP) * _CANVAS_STEP
    placed = [decode.to_canvas(r, side) for r in rgbs]
    placed += [placed[0]] * (rows - len(placed))
    return np.stack([c for c, _ in placed]), np.stack([s for _, s in placed])


# ----------------------------------------------------------------------------- features


@dataclasses.dataclass(frozen=True)
class Features:
    """What a backbone gives for a batch of B images, as float32 numpy arrays.

    cls: (B, D) the image feature (a ViT's or XCiT's final-norm CLS token, a ResNet's pooled
        layer4), what the k-NN evaluation uses.
    patch_tokens: (B, N, D) final-norm patch tokens in row-major grid order (ViTs, XCiT;
        DINOv2's registers and DINOv3's storage tokens excluded); None for a ResNet.
    attention: (B, heads, 1 + N, 1 + N) the last block's self-attention (DINO's ViT only);
        attention[:, :, 0, 1:] is the CLS query over the patches. None when not computed.
    intermediates: final-norm (B, 1 + N, D) outputs (CLS, then patches) of the last
        `n_last_blocks` blocks, the linear probe's inputs (ViTs); () when not asked.
    """

    cls: np.ndarray
    patch_tokens: np.ndarray | None
    attention: np.ndarray | None
    intermediates: tuple[np.ndarray, ...]


def _outputs(backbone, n_last_blocks: int, attention: bool, variables, images) -> dict:
    """The Features fields of one batch, as float32 device arrays."""
    kwargs = {"n_last_blocks": n_last_blocks} if n_last_blocks else {}
    if attention:
        kwargs["return_attention"] = True
    out = backbone.apply(variables, images, **kwargs)
    patches = getattr(out, "patch_tokens", None)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return {
        "cls": f32(out.feature),
        "patch_tokens": None if patches is None else f32(patches),
        "attention": f32(out.attention) if attention else None,
        "intermediates": tuple(f32(x) for x in getattr(out, "intermediates", ())),
    }


@functools.lru_cache(maxsize=16)  # one jit (and so one compilation per shape) per setting
def _feature_fn(backbone, n_last_blocks: int, attention: bool):
    return jax.jit(functools.partial(_outputs, backbone, n_last_blocks, attention))


def feature_errors(backbone, images, n_last_blocks: int, attention) -> list[str]:
    """What keeps `features` from running on `images`, found before any compute."""
    name = type(backbone).__name__
    shape = tuple(np.shape(images))
    errors = []
    if not jnp.issubdtype(images.dtype, jnp.floating):
        errors.append(
            f"{images.dtype} images: features() takes normalised floats, as preprocess()"
            " returns them (features(model, variables, preprocess(images)))"
        )
    if len(shape) != 4 or shape[-1] != 3:
        errors.append(
            f"images of shape {shape}: a (B, H, W, 3) batch, as preprocess() returns"
            " (one image: images[None])"
        )
    elif shape[0] == 0:
        errors.append("an empty batch of images")
    else:
        multiple = size_multiple(backbone)
        if shape[1] % multiple or shape[2] % multiple:
            errors.append(
                f"image size {shape[1]}x{shape[2]}: sides must be multiples of the patch size"
                f" {multiple} (preprocess() crops to 224)"
            )
    if n_last_blocks and not is_vit(backbone):
        errors.append(
            f"n_last_blocks={n_last_blocks}: intermediate blocks are a ViT's; a {name} has"
            " its output feature only"
        )
    elif not 0 <= n_last_blocks <= (vit_depth(backbone) or 0):
        errors.append(f"n_last_blocks={n_last_blocks} outside [0, depth={vit_depth(backbone)}]")
    if attention and not has_attention_maps(backbone):
        errors.append(
            f"attention=True: attention maps are DINO's ViT's; a {name} returns none (pass"
            " attention=None to get them where there are any)"
        )
    return errors


def features(
    model,
    variables,
    images: np.ndarray | jax.Array,
    *,
    n_last_blocks: int = 0,
    attention: bool | None = None,
    batch_size: int = 64,
) -> Features:
    """Features of a frozen backbone (eval mode: no stochastic depth, BatchNorm running
    statistics) for float32 (B, H, W, 3) images normalised as `preprocess` returns them.

    `model`, `variables`: as load_backbone / load_weights give them (any family of
    dino_jax.models.backbones). `n_last_blocks`: also the outputs of that many last blocks
    (ViTs). `attention`: None returns the last block's attention where the backbone has it
    (DINO's ViT), True requires it (ValueError for other backbones), False skips it.
    Computed `batch_size` images at a time, a short last batch padded, so that each input
    shape compiles once.
    """
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    shape = images.shape
    want_attention = has_attention_maps(model) if attention is None else bool(attention)
    errors = feature_errors(model, images, n_last_blocks, attention)
    if batch_size < 1:
        errors.append(f"batch_size={batch_size}: at least 1")
    if errors:
        raise ValueError("; ".join(errors))
    fn = _feature_fn(model, n_last_blocks, want_attention)
    variables = jax.device_put(variables)  # sent to the device once, not per batch
    images = jnp.asarray(images, jnp.float32)
    size = min(batch_size, shape[0])
    parts = []
    for start in range(0, shape[0], size):
        chunk = images[start : start + size]
        short = size - chunk.shape[0]
        if short:
            chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], short, axis=0)])
        out = jax.device_get(fn(variables, chunk))
        parts.append(jax.tree.map(lambda x, n=size - short: np.asarray(x)[:n], out))
    merged = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    return Features(
        cls=merged["cls"],
        patch_tokens=merged["patch_tokens"],
        attention=merged["attention"],
        intermediates=tuple(merged["intermediates"]),
    )

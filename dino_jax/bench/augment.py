"""On-device multi-crop augmentation cost for a full batch: ms per batch and images/s.

python -m dino_jax.bench.augment --batch 128 (ViT-S/16 recipe: 2x224 + 10x96 from 512^2 canvases).
--config.aug.window=True also runs the windowed resampling (config.aug.window) and compares it
with the whole-canvas one: one JSON line per setting, the second with its speed-up and how many
output values differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.bench.step import xla_flops
from dino_jax.config import default_config
from dino_jax.data import augment

# Analytic matmul FLOPs of one ViT-S/16 training step per source image (2 x 224 + 10 x 96
# crops, K = 65536; `bench step` computes the same figure as dino_flops_per_image).
VIT_S16_GFLOP_PER_IMAGE = 124.0
# The throughput target for ViT-S/16 on one H100 (docs/performance.md).
TARGET_IMAGES_PER_S = 2900.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="images per batch")
    p.add_argument("--canvas", type=int, default=512, help="side L of the host's canvases")
    p.add_argument("--image-hw", type=int, nargs=2, default=(375, 500), help="valid height width")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--n-local", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16", help="output dtype of the crops")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--matmul-precision",
        default=None,
        help="jax.default_matmul_precision for the resize matmuls (e.g. tensorfloat32, highest)",
    )
    p.add_argument(
        "--config.aug.window",
        dest="window",
        type=_flag,
        default=False,
        help="True: also time config.aug.window = True against the whole canvas",
    )
    p.add_argument(
        "--train-gflop",
        type=float,
        default=VIT_S16_GFLOP_PER_IMAGE,
        help="training-step GFLOP per image to compare with (0: skip)",
    )
    p.add_argument(
        "--train-images-per-s",
        type=float,
        default=TARGET_IMAGES_PER_S,
        help="training throughput whose step time the augmentation is compared with (0: skip)",
    )
    return p.parse_args(argv)


def _flag(text: str) -> bool:
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: use True or False")


def windows(cfg: augment.MultiCropConfig, canvas: int) -> dict[str, tuple[int, int]]:
    """The (height, width) of the canvas each kind of crop is resampled from."""
    kinds = {"global": cfg.global_scale, "local": cfg.local_scale}
    return {
        kind: augment.crop_window(cfg, scale, (canvas, canvas)) or (canvas, canvas)
        for kind, scale in kinds.items()
    }


def matmul_gflop(cfg: augment.MultiCropConfig, canvas: int) -> float:
    """GFLOP per image of the resize matmuls from an (h, w) window (the canvas without
    cfg.window): (out, w) x (w, h*3) then (out, h) x (h, out*3)."""
    total = 0.0
    sizes = windows(cfg, canvas)
    for kind, out, n in (
        ("global", cfg.global_size, cfg.n_global),
        ("local", cfg.local_size, cfg.n_local),
    ):
        h, w = sizes[kind]
        total += n * 2 * 3 * (out * w * h + out * h * out)
    return total / 1e9


def run(args: argparse.Namespace, window: bool = False) -> dict:
    """Times the multi-crop of one batch with config.aug.window = `window`; the figures and,
    under "crops_of_step_0", the crops of the first timed input (for comparisons)."""
    aug = default_config().aug
    aug.update(global_size=args.global_size, local_size=args.local_size, n_local=args.n_local)
    aug.window = window
    cfg = augment.MultiCropConfig.from_config(aug)
    dtype = jnp.dtype(args.dtype)
    height, width = args.image_hw
    if not (0 < height <= args.canvas and 0 < width <= args.canvas):
        raise ValueError(f"--image-hw {args.image_hw} must fit the {args.canvas} canvas")
    rng = np.random.default_rng(args.seed)
    images = np.zeros((args.batch, args.canvas, args.canvas, 3), np.uint8)
    images[:, :height, :width] = rng.integers(0, 256, (args.batch, height, width, 3))
    sizes = np.tile(np.asarray([[height, width]], np.int32), (args.batch, 1))
    images, sizes = jax.device_put(images), jax.device_put(sizes)
    base_key = jax.random.key(args.seed)

    @jax.jit
    def step(step_index, images, sizes):
        # As in training: one key per example, a function of (seed, step, example).
        keys = jax.random.split(jax.random.fold_in(base_key, step_index), images.shape[0])
        return augment.multicrop(keys, images, sizes, cfg, dtype)

    start = time.perf_counter()
    with jax.default_matmul_precision(args.matmul_precision):
        compiled = step.lower(jnp.int32(0), images, sizes).compile()
    compile_s = time.perf_counter() - start
    for i in range(args.warmup):
        jax.block_until_ready(compiled(jnp.int32(i), images, sizes))
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(jnp.int32(args.warmup + i), images, sizes))
        times.append(time.perf_counter() - start)
    ms = 1e3 * statistics.median(times)
    crops = jax.device_get(compiled(jnp.int32(0), images, sizes))
    xla = xla_flops(compiled)
    xla_gflop = None if xla is None else round(xla / 1e9 / args.batch, 3)
    result = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "batch": args.batch,
        "crops": f"{cfg.n_global}x{cfg.global_size} + {cfg.n_local}x{cfg.local_size}",
        "canvas": args.canvas,
        "image_hw": [height, width],
        "dtype": dtype.name,
        "window": window,
        "windows_hw": {kind: list(hw) for kind, hw in windows(cfg, args.canvas).items()},
        "matmul_precision": args.matmul_precision,
        "compile_s": round(compile_s, 2),
        "ms_per_batch": round(ms, 3),
        "ms_min": round(1e3 * min(times), 3),
        "images_per_s": round(args.batch / (ms / 1e3), 1),
        "matmul_gflop_per_image": round(matmul_gflop(cfg, args.canvas), 6),
        "xla_gflop_per_image": xla_gflop,
    }
    if args.train_gflop > 0:
        flop = result["xla_gflop_per_image"] or result["matmul_gflop_per_image"]
        result["flop_fraction_of_train_step"] = round(flop / args.train_gflop, 4)
    if args.train_images_per_s > 0:
        step_ms = 1e3 * args.batch / args.train_images_per_s
        result["train_images_per_s"] = args.train_images_per_s
        result["time_fraction_at_train_rate"] = round(ms / step_ms, 4)
    return {**result, "crops_of_step_0": crops}


def compare(full: dict, windowed: dict) -> dict:
    """Speed-up of the windowed run and how far its crops are from the whole-canvas ones."""
    diffs = [
        np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
        for a, b in zip(full["crops_of_step_0"], windowed["crops_of_step_0"], strict=True)
    ]
    values = sum(d.size for d in diffs)
    return {
        "speedup_vs_full": round(full["ms_per_batch"] / windowed["ms_per_batch"], 3),
        "matmul_flop_fraction_vs_full": round(
            windowed["matmul_gflop_per_image"] / full["matmul_gflop_per_image"], 4
        ),
        "values_differing_vs_full": int(sum((d > 0).sum() for d in diffs)),
        "values_compared": int(values),
        "max_abs_diff_vs_full": float(max(d.max() for d in diffs)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """One JSON line per setting: the whole canvas, then (--config.aug.window=True) the
    windowed resampling with its comparison. Returns the printed results."""
    args = parse_args(argv)
    full, printed = None, []
    for window in (False, True) if args.window else (False,):
        result = run(args, window)
        if window:
            result.update(compare(full, result))
        else:
            full = result
        print(
            f"augment on {result['device']} ({result['backend']}): batch {result['batch']} "
            f"[{result['crops']}] from {result['canvas']}^2 canvases, window={window}: "
            f"{result['ms_per_batch']:.1f} ms/batch, {result['images_per_s']:.1f} images/s "
            f"(compile {result['compile_s']} s)"
        )
        printed.append({k: v for k, v in result.items() if k != "crops_of_step_0"})
        print(json.dumps(printed[-1]), flush=True)
    return printed


if __name__ == "__main__":
    main()

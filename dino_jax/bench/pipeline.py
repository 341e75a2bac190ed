"""Host images/s per CPU core: our canvas path, host-side crops (tf.image), the official PIL loader.

Usage: python -m dino_jax.bench.pipeline [--num-images 300] [--canvas-sizes 512,256] [--seconds 5]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import pathlib
import random
import tempfile
import time
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dino_jax.data.decode import decode_image, to_canvas

# Multi-crop as in DataAugmentationDINO (main_dino.py): 2 global 224 crops, (0.4, 1) of the
# area, and local 96 crops, (0.05, 0.4); 10 local ones as in the paper's best runs (Caron et
# al. 2021), though main_dino.py's --local_crops_number defaults to 8.
GLOBAL, LOCAL = (224, (0.4, 1.0), 2), (96, (0.05, 0.4), 10)
RATIO = (3 / 4, 4 / 3)
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def make_jpegs(directory: pathlib.Path, count: int, seed: int = 0) -> list[pathlib.Path]:
    """ImageNet-like JPEGs: 500x375 (a fifth portrait), ~80 kB, cut from skimage's photos.

    Sensor-like noise and quality 95 bring the files near ImageNet's typical size; clean
    upscaled crops would compress (and decode) unrealistically well.
    """
    import skimage.data

    photos = [
        skimage.data.astronaut(),
        skimage.data.chelsea(),
        skimage.data.coffee(),
        skimage.data.rocket(),
        skimage.data.stereo_motorcycle()[0],
        skimage.data.hubble_deep_field(),
    ]
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        photo = Image.fromarray(photos[k % len(photos)])
        size = (375, 500) if rng.random() < 0.2 else (500, 375)
        scale = rng.uniform(0.5, 1.0)
        width = int(min(photo.width, photo.height * size[0] / size[1]) * scale)
        height = int(width * size[1] / size[0])
        left = rng.integers(0, photo.width - width + 1)
        top = rng.integers(0, photo.height - height + 1)
        crop = photo.crop((left, top, left + width, top + height)).resize(size, Image.LANCZOS)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        noisy = np.asarray(crop, np.float32) + rng.normal(0.0, 4.0, (size[1], size[0], 3))
        paths.append(directory / f"{k:05d}.jpg")
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(paths[-1], quality=95)
    return paths


def measure(step: Callable[[], int], seconds: float) -> dict[str, float]:
    """Run `step` (returns images done) at least once and for at least `seconds`; wall and
    process-CPU rates."""
    step()  # warm-up: imports, caches, tf.data start
    images, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while not images or time.perf_counter() - wall0 < seconds:
        images += step()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "images": images,
        "wall_s": wall,
        "cpu_s": cpu,
        "per_s": images / wall,
        "per_cpu_s": images / cpu,
    }


# ----------------------------------------------------------------------------- (a) canvas


def canvas_loop(files: list[bytes], canvas_size: int) -> Callable[[], int]:
    """Our per-image host work in a plain loop on one core: decode, <= 1 downscale, pad."""

    def step() -> int:
        for data in files:
            to_canvas(decode_image(data, canvas_size), canvas_size)
        return len(files)

    return step


def canvas_pipeline(directory: pathlib.Path, canvas_size: int, threads: int) -> Callable[[], int]:
    """The real tf.data folder pipeline (batches of up to 64) with `threads` decode threads."""
    import ml_collections

    from dino_jax.data import pipeline

    config = ml_collections.ConfigDict(
        dict(
            source="folder",
            split="",
            tfds_name="",
            data_dir=str(directory),
            manual_dir="",
            canvas_size=canvas_size,
            seed=0,
            shuffle_buffer=0,
            num_parallel_calls=threads,
            synthetic_examples=0,
            synthetic_classes=0,
        )
    )
    size = min(64, sum(1 for _ in directory.glob("*.jpg")))
    batches = iter(pipeline.train_data(config, size, process_index=0, process_count=1))

    def step() -> int:
        return sum(len(next(batches)["label"]) for _ in range(4))

    return step


# ----------------------------------------------------------------------------- (b) host crops


def host_crop_pipeline(paths: list[pathlib.Path], threads: int) -> Callable[[], int]:
    """The alternative: decode and all 12 random-resized crops on the host with tf.image."""
    from dino_jax.data.sources import import_tensorflow

    tf = import_tensorflow()

    def crops(path: tf.Tensor) -> tuple:
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        out = []
        for size, scale, count in (GLOBAL, LOCAL):
            for _ in range(count):
                begin, extent, _ = tf.image.sample_distorted_bounding_box(
                    tf.shape(image),
                    tf.zeros((1, 0, 4)),
                    aspect_ratio_range=RATIO,
                    area_range=scale,
                    max_attempts=10,
                    use_image_if_no_bounding_boxes=True,
                )
                crop = tf.slice(image, begin, extent)
                crop = tf.image.resize(crop, (size, size), "bicubic", antialias=True)
                out.append(tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8))
        return tuple(out)

    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    ds = tf.data.Dataset.from_tensor_slices([str(p) for p in paths]).repeat()
    ds = ds.map(crops, num_parallel_calls=threads).batch(64).prefetch(2).with_options(options)
    batches = iter(ds)
    return lambda: len(next(batches)[0])


# ----------------------------------------------------------------------------- (c) official


def random_resized_crop(
    image: Image.Image, size: int, scale: tuple, rng: random.Random
) -> Image.Image:
    """torchvision RandomResizedCrop on a PIL image: 10 tries, central fallback, bicubic."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:
        ratio = width / height
        if ratio < RATIO[0]:
            w, h = width, round(width / RATIO[0])
        elif ratio > RATIO[1]:
            h, w = height, round(height * RATIO[1])
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def color_jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) the way torchvision does it on PIL images."""
    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4)),
        lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 1.4)),
        lambda im: ImageEnhance.Color(im).enhance(rng.uniform(0.8, 1.2)),
        lambda im: adjust_hue(im, rng.uniform(-0.1, 0.1)),
    ]
    rng.shuffle(ops)
    for op in ops:
        image = op(image)
    return image


def adjust_hue(image: Image.Image, factor: float) -> Image.Image:
    hue, saturation, value = image.convert("HSV").split()
    shifted = (np.asarray(hue, np.uint8) + np.uint8(int(factor * 255) % 256)).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), saturation, value)).convert("RGB")


def official_view(image, size, scale, blur_p, solarize_p, rng) -> np.ndarray:
    view = random_resized_crop(image, size, scale, rng)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        view = color_jitter(view, rng)
    if rng.random() < 0.2:
        view = Image.merge("RGB", [view.convert("L")] * 3)
    if rng.random() < blur_p:
        view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < solarize_p:
        view = ImageOps.solarize(view, 128)
    array = np.asarray(view, np.float32) / 255.0  # ToTensor + Normalize
    return ((array - MEAN) / STD).transpose(2, 0, 1)


def official_loop(paths: list[pathlib.Path], seed: int = 0) -> Callable[[], int]:
    """DINO's DataAugmentationDINO re-created with PIL, per image, on one core."""
    rng = random.Random(seed)

    def step() -> int:
        for path in paths:
            with open(path, "rb") as f:
                image = Image.open(f).convert("RGB")
            official_view(image, 224, GLOBAL[1], 1.0, 0.0, rng)
            official_view(image, 224, GLOBAL[1], 0.1, 0.2, rng)
            for _ in range(LOCAL[2]):
                official_view(image, 96, LOCAL[1], 0.5, 0.0, rng)
        return len(paths)

    return step


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--canvas-sizes", default="512,256")
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum time per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for the all-core runs")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args(argv)

    from dino_jax.data.sources import import_tensorflow

    tf = import_tensorflow()
    try:  # per-core figures: no op may spread over several cores behind our back
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        print("TensorFlow was already running: its ops may use several threads")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        paths = make_jpegs(directory, args.num_images)
        files = [p.read_bytes() for p in paths]
        kb = sum(map(len, files)) / len(files) / 1e3
        print(f"{len(paths)} JPEGs, 500x375, {kb:.0f} kB on average; {args.threads} cores")
        # Factories: each stream exists only while it is measured (tf.data reads ahead).
        runs, n = {}, args.threads
        for canvas in map(int, args.canvas_sizes.split(",")):
            runs[f"canvas {canvas}, loop, 1 core"] = functools.partial(canvas_loop, files, canvas)
            runs[f"canvas {canvas}, tf.data, 1 thread"] = functools.partial(
                canvas_pipeline, directory, canvas, 1
            )
            runs[f"canvas {canvas}, tf.data, {n} threads"] = functools.partial(
                canvas_pipeline, directory, canvas, n
            )
        runs["host crops (tf.image), 1 thread"] = functools.partial(host_crop_pipeline, paths, 1)
        runs[f"host crops (tf.image), {n} threads"] = functools.partial(
            host_crop_pipeline, paths, n
        )
        few = paths[: max(4, len(paths) // 10)]
        runs["official loader (PIL), 1 core"] = functools.partial(official_loop, few)
        print(f"{'path':40s} {'img/s':>8s} {'img/CPU-s':>10s}")
        for name, make_step in runs.items():
            results[name] = measure(make_step(), args.seconds)
            gc.collect()  # drop the finished stream and its threads before the next run
            print(f"{name:40s} {results[name]['per_s']:8.1f} {results[name]['per_cpu_s']:10.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

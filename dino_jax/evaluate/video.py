"""Attention videos: the last block's CLS attention of every frame, as PNGs and an mp4.

Follows the official video_generation.py: frames from a video file (its frame rate kept) or a
folder of images (sorted by name), each resized and cut to whole patches, the last block's
CLS -> patch attention, the mean over the heads upsampled (nearest) by the patch size and drawn
as a heat map scaled to its own range, one picture per frame, then a video of them. The
official script also thresholds every head's map and throws the masks away; here the mean
map's mask (keeping `threshold` of its mass, as visualize_attention.py's) is drawn over the
frame as a second video. Frames go through the backbone `batch_size` at a time, one
compilation for the whole video, and are written as they come: memory does not grow with the
video's length.

Videos are read and written with PyAV (`pip install av`: wheels that bundle FFmpeg), imported
only here.
"""

from __future__ import annotations

import contextlib
import fractions
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from dino_jax.evaluate.attention import (
    DEFAULT_THRESHOLD,
    _save_png,
    cls_attention,
    heatmap,
    overlay,
    prepare_image,
    threshold_masks,
    upsample,
)

DEFAULT_FPS = 30.0  # video_generation.py's --fps, for frames from a folder
DEFAULT_SIZE = 480  # shorter side of the frames the network sees (the attention command's)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INSTALL = "pip install av"  # PyAV: FFmpeg's libraries in its wheels, no system ffmpeg needed


class VideoError(ValueError):
    """The input cannot be read as a video or a folder of frames (the message says why)."""


def import_av():
    """PyAV, or VideoError saying how to install it."""
    try:
        import av
    except ImportError:
        raise VideoError(f"attention videos need PyAV (videos in and out): {INSTALL}") from None
    return av


# ----------------------------------------------------------------------------- input


def _natural_key(name: str) -> list:
    """frame-2 before frame-10: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def folder_frames(folder: str) -> list[str]:
    """The image files of `folder` (not its sub-folders), in natural name order."""
    names = [
        n
        for n in os.listdir(folder)
        if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, n))
    ]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def input_error(path: str) -> str | None:
    """Why `path` cannot give frames (checked, not decoded, for a folder; the first frame
    decoded for a video), or None."""
    if not os.path.exists(path):
        return f"--input {path}: no such file or folder"
    if os.path.isdir(path):
        frames = folder_frames(path)
        if not frames:
            return f"--input {path} holds no images ({', '.join(IMAGE_SUFFIXES)})"
        for frame in frames:
            try:
                with Image.open(frame) as image:
                    image.verify()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                return f"--input {path}: {frame} is not a readable image ({err})"
        return None
    try:
        av = import_av()
    except VideoError as err:
        return str(err)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return f"--input {path} has no video stream"
            next(container.decode(video=0))
    except StopIteration:
        return f"--input {path} has no frames"
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        return f"--input {path} is not a readable video ({type(err).__name__}: {err})"
    return None


class Frames:
    """The (name, uint8 (H, W, 3) frame) pairs of a video file (named frame-00000, ... as
    they come) or a folder (named by their file stems); `total`: their number (None where a
    container does not say), `rate`: a video's frames per second (None for a folder)."""

    def __init__(self, path: str):
        self.path = path
        self.is_video = not os.path.isdir(path)
        if self.is_video:
            av = import_av()
            with av.open(path) as container:
                stream = container.streams.video[0]
                self.total = stream.frames or None
                self.rate = stream.average_rate or stream.guessed_rate
        else:
            self.files = folder_frames(path)
            self.total = len(self.files)
            self.rate = None

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        if not self.is_video:
            for file in self.files:
                with Image.open(file) as image:
                    frame = np.asarray(image.convert("RGB"))
                yield os.path.splitext(os.path.basename(file))[0], frame
            return
        with import_av().open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # decode on several threads
            for i, frame in enumerate(container.decode(stream)):
                yield f"frame-{i:05d}", frame.to_ndarray(format="rgb24")


def prepared(
    frames: Iterable[tuple[str, np.ndarray]], image_size, patch_size: int
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, frame) pairs with the frame resized and cut to whole patches
    (attention.prepare_image), all to the first frame's size: a folder's odd frame out is
    resized to it, as a video holds one size."""
    shape = None
    for name, frame in frames:
        image = prepare_image(frame, image_size, patch_size)
        if shape is None:
            shape = image.shape[:2]
        elif image.shape[:2] != shape:
            image = prepare_image(frame, shape, patch_size)
        yield name, image


# ----------------------------------------------------------------------------- attention


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def frame_attention(
    backbone, variables, frames: Iterable[tuple[str, np.ndarray]], *, mean, std, batch_size=8
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, maps) for each (name, image) pair of equal-size uint8 (H, W, 3) images:
    `maps` (heads, h, w) is the last block's CLS -> patch attention, computed `batch_size`
    images at a time (a short last batch padded: one compilation), a batch while the previous
    one is handed out."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    variables = jax.device_put(variables)
    pending = None
    for batch in _batches(frames, batch_size):
        images = [image for _, image in batch]
        stack = np.stack(images + [images[-1]] * (batch_size - len(batch)))
        maps = cls_attention(backbone, variables, jnp.asarray(stack), mean, std)
        if pending is not None:
            yield from _ready(*pending)
        pending = (batch, maps)
    if pending is not None:
        yield from _ready(*pending)


def _ready(batch: list[tuple[str, np.ndarray]], maps: jax.Array):
    for (name, image), m in zip(batch, np.asarray(maps), strict=False):
        yield name, image, m


def attention_picture(maps: np.ndarray, patch_size: int) -> np.ndarray:
    """video_generation.py's frame: the heads' mean map, nearest-upsampled, as a heat map."""
    return heatmap(upsample(maps.mean(axis=0), patch_size))


def mask_picture(image: np.ndarray, maps: np.ndarray, patch_size: int, threshold: float):
    """The frame where the heads' mean map keeps `threshold` of its mass, dimmed elsewhere."""
    return overlay(image, upsample(threshold_masks(maps.mean(axis=0), threshold), patch_size))


# ----------------------------------------------------------------------------- output


class VideoWriter:
    """An H.264 mp4 (MPEG-4 part 2 where PyAV's FFmpeg has no libx264) of equal-size uint8
    RGB pictures, opened at the first one. Odd sides are padded by one repeated row or
    column: 4:2:0 video needs even sides."""

    def __init__(self, path: str, rate: fractions.Fraction):
        self.av = import_av()
        self.path, self.rate = path, rate
        self.container = self.stream = None

    def write(self, picture: np.ndarray) -> None:
        height, width = picture.shape[:2]
        pad = ((0, height % 2), (0, width % 2), (0, 0))
        picture = np.pad(picture, pad, mode="edge") if any(p[1] for p in pad[:2]) else picture
        if self.stream is None:
            codec = "libx264" if "libx264" in self.av.codecs_available else "mpeg4"
            self.container = self.av.open(self.path, mode="w")
            self.stream = self.container.add_stream(codec, rate=self.rate)
            self.stream.height, self.stream.width = picture.shape[:2]
            self.stream.pix_fmt = "yuv420p"
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode(None))  # flush the encoder's delayed frames
            self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def frame_rate(fps: float | None, source: fractions.Fraction | None) -> fractions.Fraction:
    """The output rate: `fps` if given, else the input video's, else video_generation.py's 30."""
    if fps is not None:
        return fractions.Fraction(fps).limit_denominator(1001)
    return fractions.Fraction(source) if source else fractions.Fraction(DEFAULT_FPS)


def make_video(
    input_path: str,
    backbone,
    variables,
    out_dir: str,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | Sequence[int] | None = DEFAULT_SIZE,
    threshold: float | None = DEFAULT_THRESHOLD,
    fps: float | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Attention pictures and videos of a video file or a folder of frames in `out_dir`:
    attention/attn-<frame>.png and video.mp4; with a `threshold`, masks/mask-<frame>.png and
    video-masks.mp4; for a video input, frames/<frame>.png, the frames as the network saw
    them. `image_size` as attention.prepare_image (None: the frames' own size, the official
    default; big frames need much memory: the attention is tokens x tokens per head).
    Returns what was written (JSON-friendly)."""
    frames = Frames(input_path)
    rate = frame_rate(fps, frames.rate)
    folders = ["attention", *(["masks"] if threshold is not None else [])]
    folders += ["frames"] if frames.is_video else []
    for name in folders:
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    videos = [os.path.join(out_dir, "video.mp4")]
    if threshold is not None:
        videos.append(os.path.join(out_dir, "video-masks.mp4"))
    p = backbone.patch_size
    results = frame_attention(
        backbone,
        variables,
        prepared(frames, image_size, p),
        mean=mean,
        std=std,
        batch_size=batch_size,
    )
    count, size = 0, None
    bar = tqdm(total=frames.total, desc="attention video", unit="frame", disable=not show_progress)
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(VideoWriter(v, rate)) for v in videos]
        stack.callback(bar.close)
        for name, image, maps in results:
            picture = attention_picture(maps, p)
            _save_png(os.path.join(out_dir, "attention", f"attn-{name}.png"), picture)
            writers[0].write(picture)
            if threshold is not None:
                masked = mask_picture(image, maps, p, threshold)
                _save_png(os.path.join(out_dir, "masks", f"mask-{name}.png"), masked)
                writers[1].write(masked)
            if frames.is_video:
                _save_png(os.path.join(out_dir, "frames", f"{name}.png"), image)
            count, size = count + 1, list(image.shape[:2])
            bar.update()
    return {
        "input": input_path,
        "frames": count,
        "fps": float(rate),
        "size": size,
        "videos": videos,
        "folders": [os.path.join(out_dir, name) for name in folders],
    }

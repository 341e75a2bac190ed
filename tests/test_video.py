"""`dino-jax-evaluate video`: attention videos of a folder of frames and of a video file, with
an official-format ViT, read back with PyAV; bad inputs refused before any compute."""

import fractions
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data

from dino_jax.evaluate import attention, video
from dino_jax.evaluate.cli import evaluate
from dino_jax.evaluate.weights import load_weights
from dino_jax.interop.pth_write import save_pth

av = pytest.importorskip("av")

ROOT = pathlib.Path(__file__).resolve().parent.parent
WEIGHTS = str(ROOT / "tests" / "fixtures" / "backbone.pth")  # an official-format ViT/8
VIT = ["--weights", WEIGHTS, "--num_heads", "2"]
NAMES = ["shot-1", "shot-2", "shot-3", "shot-10", "shot-11"]  # natural order, not string order


@pytest.fixture(scope="module")
def official():
    return load_weights(WEIGHTS, num_heads=2)


def moving(i: int, height: int, width: int) -> np.ndarray:
    """Frame i of the astronaut panning left, at (height, width)."""
    shifted = np.roll(data.astronaut(), -40 * i, axis=1)
    return np.asarray(Image.fromarray(shifted).resize((width, height), Image.BILINEAR))


@pytest.fixture(scope="module")
def frames_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    for i, name in enumerate(NAMES):
        # the third frame has another shape: it is brought to the first frame's size
        size = (150, 160) if i == 2 else (100, 120)
        Image.fromarray(moving(i, *size)).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not a frame")
    return folder


def write_video(path, frames, rate=12, codec="mpeg4"):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def read_video(path):
    """(frames, rate) of a video file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], stream.average_rate


def png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_video_of_a_folder_of_frames(official, frames_folder, tmp_path):
    out = tmp_path / "out"
    argv = ["video", *VIT, "--input", str(frames_folder), "--out", str(out), "--resize", "64"]
    result = evaluate([*argv, "--fps", "10", "--batch_size", "2"])
    assert result["frames"] == 5 and result["fps"] == 10.0
    assert result["size"] == [64, 72]  # 100 x 120 -> 64 x 76 -> whole 8-px patches
    assert sorted(p.name for p in out.iterdir()) == [
        "attention",
        "masks",
        "video-masks.mp4",
        "video.mp4",
    ]
    backbone, variables, info = official
    pictures = []
    for i, name in enumerate(NAMES):
        image = attention.prepare_image(png(frames_folder / f"{name}.png"), 64, 8)
        if i == 2:
            assert image.shape[:2] != (64, 72)
            image = attention.prepare_image(png(frames_folder / f"{name}.png"), (64, 72), 8)
        maps = attention.attention_of(backbone, variables, image, info.mean, info.std)
        # video_generation.py's picture: the heads' mean, nearest-upsampled, as a heat map
        expected = attention.heatmap(attention.upsample(maps.mean(axis=0), 8))
        picture = png(out / "attention" / f"attn-{name}.png")
        assert np.abs(picture.astype(int) - expected).max() <= 1, name  # float rounding only
        kept = attention.upsample(attention.threshold_masks(maps.mean(axis=0), 0.6), 8)
        masked = png(out / "masks" / f"mask-{name}.png")
        np.testing.assert_array_equal(masked[kept], image[kept])
        assert 0 < kept.mean() < 1
        pictures.append(picture)
    assert len({p.tobytes() for p in pictures}) == 5  # the frames do differ

    for name, shown in (("video.mp4", pictures), ("video-masks.mp4", None)):
        frames, rate = read_video(out / name)
        assert len(frames) == 5 and frames[0].shape == (64, 72, 3) and rate == 10
        if shown is None:
            continue
        # each (lossy) video frame is closest to its own picture: the frames are in order
        errors = np.array([[np.abs(f.astype(int) - p).mean() for p in shown] for f in frames])
        np.testing.assert_array_equal(errors.argmin(axis=1), np.arange(5))
        assert errors.diagonal().max() < 12


def test_video_of_a_video_file(official, tmp_path):
    source = [moving(i, 64, 96) for i in range(7)]
    path = write_video(tmp_path / "clip.mp4", source, rate=12)
    decoded, _ = read_video(path)
    out = tmp_path / "out"
    result = evaluate(
        [
            "video",
            *VIT,
            "--input",
            str(path),
            "--out",
            str(out),
            "--resize",
            "none",
            "--threshold",
            "-1",
            "--batch_size",
            "3",
        ]
    )
    assert result["frames"] == 7 and result["fps"] == 12.0 and result["size"] == [64, 96]
    assert sorted(p.name for p in out.iterdir()) == ["attention", "frames", "video.mp4"]
    names = [f"frame-{i:05d}" for i in range(7)]
    assert sorted(p.stem for p in (out / "frames").iterdir()) == names
    for i, name in enumerate(names):  # the frames as decoded (the video's own size kept)
        np.testing.assert_array_equal(png(out / "frames" / f"{name}.png"), decoded[i])
    frames, rate = read_video(out / "video.mp4")
    assert len(frames) == 7 and frames[0].shape == (64, 96, 3) and rate == 12
    first = png(out / "attention" / "attn-frame-00000.png")
    assert np.abs(frames[0].astype(int) - first).mean() < 12


def test_writer_pads_odd_sides_and_keeps_the_rate(tmp_path):
    pictures = [np.full((33, 45, 3), 40 * i, np.uint8) for i in range(3)]
    rate = video.frame_rate(29.97, None)
    assert rate == fractions.Fraction(2997, 100)
    with video.VideoWriter(str(tmp_path / "odd.mp4"), rate) as writer:
        for picture in pictures:
            writer.write(picture)
    frames, read_rate = read_video(tmp_path / "odd.mp4")
    assert len(frames) == 3 and frames[0].shape == (34, 46, 3) and read_rate == rate
    np.testing.assert_allclose(frames[2][:33, :45].mean(), 80, atol=3)
    assert video.frame_rate(None, fractions.Fraction(25)) == 25
    assert video.frame_rate(None, None) == 30


def refused(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err


def test_bad_inputs_are_refused_before_any_compute(frames_folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "video.mp4").write_bytes(b"")
    out = str(tmp_path / "out")
    frames = ["--input", str(frames_folder)]
    cases = [
        (["--input", str(tmp_path / "missing"), "--out", out], "no such file or folder"),
        (["--input", str(tmp_path / "empty"), "--out", out], "holds no images"),
        (["--input", str(tmp_path / "broken.mp4"), "--out", out], "is not a readable video"),
        ([*frames, "--out", str(tmp_path / "used")], "is not empty"),
        ([*frames, "--out", out, "--resize", "big"], "--resize big: one positive int"),
        ([*frames, "--out", out, "--resize", "1", "2", "3"], "--resize 1 2 3"),
        ([*frames, "--out", out, "--fps", "0"], "--fps 0.0: a positive frame rate"),
        ([*frames, "--out", out, "--batch_size", "0"], "--batch_size 0"),
        ([*frames, "--out", out, "--resize", "4"], "--resize: at least one 8-px patch"),
        ([*frames, "--out", out, "--config.eval.crop=64"], "video takes no config"),
    ]
    for args, message in cases:
        refused(capsys, ["video", *VIT, *args], message)
    # an official ResNet backbone file (resnet.npz: torchvision's layout, BatchNorm buffers)
    with np.load(ROOT / "tests" / "fixtures" / "resnet.npz") as arrays:
        state = {k[len("param/") :]: arrays[k] for k in arrays.files if k.startswith("param/")}
    checkpoint = tmp_path / "resnet_pretrain.pth"
    save_pth({k: v for k, v in state.items() if not k.startswith("head/")}, checkpoint)
    argv = ["video", "--weights", str(checkpoint), *frames, "--out", out]
    refused(capsys, argv, "attention maps need DINO's ViT")
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    refused(
        capsys,
        ["video", *VIT, "--input", str(tmp_path / "broken.mp4"), "--out", out],
        "pip install av",
    )
    assert not (tmp_path / "out").exists()

"""The pipeline benchmark runs end to end on a handful of images (speed is not tested here)."""

from dino_jax.bench import pipeline as bench


def test_benchmark_runs_and_reports_every_path(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--num-images", "4", "--seconds", "0.01", "--canvas-sizes", "64", "--threads", "1"]
    results = bench.main([*argv, "--json", str(out)])
    assert out.exists()
    assert len(results) == 6  # 3 canvas runs, 2 host-crop runs, the official loader
    for name, figures in results.items():
        assert figures["images"] > 0 and figures["per_cpu_s"] > 0, name


def test_official_crop_follows_torchvision_geometry():
    import random

    from PIL import Image

    image = Image.new("RGB", (500, 375))
    rng = random.Random(0)
    for size, scale in ((224, (0.4, 1.0)), (96, (0.05, 0.4))):
        assert bench.random_resized_crop(image, size, scale, rng).size == (size, size)
    view = bench.official_view(image, 96, (0.05, 0.4), 1.0, 1.0, rng)
    assert view.shape == (3, 96, 96) and view.dtype == "float32"

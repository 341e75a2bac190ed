"""The demo recipe for 3 of its 10 epochs, through train(): k-NN during training and at the end
with its baselines, attention PNGs, and the linear probe from the work directory beating k-NN
on the same network at its random initialisation."""

import json
import pathlib

from dino_jax import parallel, recipe
from dino_jax.config import load_recipe
from dino_jax.evaluate.baselines import random_init_knn
from dino_jax.evaluate.cli import evaluate
from dino_jax.trainer import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
EPOCHS = 3


def demo_config(epochs: int):
    config = load_recipe(ROOT / "configs" / "demo.py")
    config.optim.epochs = epochs
    config.train.progress_bar = False
    return config


def test_short_demo_evaluates_and_its_linear_probe_beats_random_init_knn(tmp_path):
    config = demo_config(EPOCHS)
    config.eval.knn_every_epochs = 1
    workdir = tmp_path / "run"
    result = train(config, str(workdir))
    assert result.status == "finished"
    spe = result.steps_per_epoch

    # k-NN after epochs 1 and 2 and at the end, logged next to the training records
    records = [json.loads(line) for line in (workdir / "train.jsonl").open()]
    knn = [r for r in records if "knn/top1" in r]
    assert [r["step"] for r in knn] == [spe, 2 * spe, EPOCHS * spe]
    assert [r["epoch"] for r in knn] == [1, 2, EPOCHS]
    assert any("train/loss" in r and spe - 20 <= r["step"] <= spe for r in records)
    final = result.metrics
    assert final["knn/top1"] == knn[-1]["knn/top1"]
    # the baselines of the end of the run, recomputed independently for the random network
    init = random_init_knn(config, recipe.build(config, spe), parallel.make_mesh())
    assert final["knn_random_init/top1"] == init["knn/top1"]
    assert 0 < final["knn_pixels/top1"] <= 100
    for i in range(config.eval.attention_images):
        assert (workdir / "attention" / f"{i:02d}" / "overview.png").stat().st_size > 0
    # The same command again: nothing trained, evaluated or logged twice, the same figures.
    again = train(config, str(workdir))
    assert again.status == "finished" and again.metrics == final
    assert len((workdir / "train.jsonl").read_text().splitlines()) == len(records)

    probe = evaluate(
        [
            "linear",
            "--weights",
            str(workdir),
            "--config.linear.epochs=10",
            "--config.linear.lr=1.0",
            "--config.linear.batch_size=128",
            "--config.linear.n_last_blocks=1",
            "--config.linear.avgpool=True",
            # 28-pixel Fashion-MNIST: random-resized crops cut away the silhouette that tells
            # the classes apart, so the probe trains on whole images (flips only)
            "--config.linear.crop_scale=(1.0, 1.0)",
        ]
    )
    assert probe["best_top1"] > init["knn/top1"] + 2, (probe["best_top1"], init["knn/top1"])

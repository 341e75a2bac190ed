"""The linear probe, end to end from a work directory, on the demo network after a short run
(3 of the demo's 10 epochs), beats k-NN on the same network at its random initialisation."""

import importlib.util
import pathlib

from dino_jax import parallel, recipe
from dino_jax.evaluate.__main__ import main
from dino_jax.evaluate.baselines import random_init_knn
from dino_jax.trainer import train

ROOT = pathlib.Path(__file__).resolve().parent.parent


def demo_config(epochs: int):
    spec = importlib.util.spec_from_file_location("demo", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.optim.epochs = epochs
    config.train.progress_bar = False
    return config


def test_linear_probe_beats_random_init_knn(tmp_path):
    config = demo_config(epochs=3)
    trained = config.copy_and_resolve_references()
    trained.data.eval_test_split = ""  # evaluated below, from the work directory
    assert train(trained, str(tmp_path / "run")).status == "finished"
    init = random_init_knn(config, recipe.build_network(config), parallel.make_mesh())
    probe = main(
        [
            "linear",
            "--weights",
            str(tmp_path / "run"),
            "--data.eval_test_split",
            config.data.eval_test_split,
            "--linear.epochs",
            "10",
            "--linear.lr",
            "1.0",
            "--linear.batch_size",
            "128",
            "--linear.n_last_blocks",
            "1",
            "--linear.avgpool",
            "True",
            # 28-pixel Fashion-MNIST: random-resized crops cut away the silhouette that tells
            # the classes apart, so the probe trains on whole images (flips only)
            "--linear.crop_scale",
            "(1.0, 1.0)",
        ]
    )
    assert probe["best_top1"] > init["knn/top1"] + 2, (probe["best_top1"], init["knn/top1"])

"""Reference points for a k-NN figure: the same network at its random initialisation, and
raw pixels (the eval transform's normalised crop, flattened) on the same splits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from dino_jax import parallel
from dino_jax.data.pipeline import eval_data
from dino_jax.evaluate.features import eval_transform, extract
from dino_jax.evaluate.knn_eval import knn_evaluation, knn_metrics
from dino_jax.recipe import Recipe
from dino_jax.state import backbone_variables


def random_init_knn(config: ml_collections.ConfigDict, recipe: Recipe, mesh) -> dict[str, float]:
    """k-NN of the teacher backbone as initialised from `config.seed` (before any step):
    the training run's own initial parameters, recreated from the seed."""
    model = recipe.hp.model
    variables = jax.jit(lambda key: model.init({"params": key}, recipe.sample_crops()))(
        jax.random.key(config.seed)
    )
    params = backbone_variables(variables["params"], variables.get("batch_stats", {}))
    return knn_evaluation(config, model.backbone, params, mesh)


def pixel_knn(config: ml_collections.ConfigDict, mesh) -> dict[str, float]:
    """k-NN on raw pixels: each eval crop normalised and flattened, then L2-normalised."""
    transform = functools.partial(
        eval_transform,
        resize=config.eval.resize,
        crop=config.eval.crop,
        mean=tuple(config.aug.mean),
        std=tuple(config.aug.std),
        dtype=jnp.float32,
    )
    data = parallel.batch_sharding(mesh)

    @functools.partial(jax.jit, in_shardings=(None, data), out_shardings=data)
    def pixels(_, batch):
        images = transform(batch["image"], batch["size"])
        return images.reshape(images.shape[0], -1)

    def split(name):
        return extract(pixels, None, eval_data(config.data, name, config.eval.batch_size), mesh)

    train, test = split(config.data.eval_train_split), split(config.data.eval_test_split)
    return knn_metrics(config, train, test, mesh)


def baseline_metrics(config: ml_collections.ConfigDict, recipe: Recipe, mesh) -> dict[str, float]:
    """`knn_random_init/top1` and `knn_pixels/top1`, the two figures a k-NN result is read
    against."""
    return {
        "knn_random_init/top1": random_init_knn(config, recipe, mesh)["knn/top1"],
        "knn_pixels/top1": pixel_knn(config, mesh)["knn/top1"],
    }

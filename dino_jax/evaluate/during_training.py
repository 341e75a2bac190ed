"""What a training run evaluates: k-NN of the teacher backbone every `eval.knn_every_epochs`
epochs and at the end; at the end also its baselines and attention maps, when configured."""

from __future__ import annotations

import jax
import ml_collections

from dino_jax.data.sources import check_eval_classes
from dino_jax.evaluate import baselines
from dino_jax.evaluate.attention import save_demo_attention
from dino_jax.evaluate.knn_eval import knn_evaluation
from dino_jax.recipe import Recipe
from dino_jax.state import TrainState, backbone_variables


class TrainingEvaluator:
    """Called by the training loop with the state after an epoch; returns its metrics.

    Made before training: k-NN splits that disagree on class names are refused (DataError)
    then, not after the first epoch."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        recipe: Recipe,
        mesh: jax.sharding.Mesh,
        workdir: str,
    ):
        check_eval_classes(config.data)
        self.config, self.recipe, self.mesh, self.workdir = config, recipe, mesh, workdir

    def due(self, epoch: int) -> bool:
        every = self.config.eval.knn_every_epochs
        return bool(every) and epoch % every == 0 and epoch < self.config.optim.epochs

    def __call__(self, state: TrainState, epoch: int, final: bool = False) -> dict[str, float]:
        backbone = self.recipe.hp.model.backbone
        params = backbone_variables(state.teacher, state.teacher_stats)
        metrics = knn_evaluation(self.config, backbone, params, self.mesh)
        metrics["epoch"] = float(epoch)
        if final and self.config.eval.report_baselines:
            metrics.update(baselines.baseline_metrics(self.config, self.recipe, self.mesh))
        if final and self.config.eval.attention_images:  # a ViT (validated)
            save_demo_attention(self.config, backbone, params, self.workdir)
        return metrics

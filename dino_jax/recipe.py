"""The static parts of a DINO run built from a config: network, schedules, optimiser, crops."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dino_jax.data.augment import MultiCropConfig
from dino_jax.data.masking import StepMasks, dinov2_masking_generator
from dino_jax.models import DINOHead, MultiCropNetwork
from dino_jax.models.backbones import build_backbone, size_multiple
from dino_jax.objective import Objective, objective_from_config
from dino_jax.optim import dino_optimizer
from dino_jax.optim_flat import flat_optimizer
from dino_jax.schedules import Schedules
from dino_jax.state import TrainState, init_state, sample_crops
from dino_jax.train_step import DinoHParams, GramRefresh


def attention_implementation(setting: str) -> str | None:
    """The jax.nn.dot_product_attention implementation for `model.attention`.

    "auto" is XLA: cuDNN's fused kernel (JAX 0.11) refuses ViT sequence lengths such as
    197 = 14 * 14 + 1 in training (measured on an H100), so it is only used when asked for
    with "cudnn" (sequence lengths it supports, bf16/fp16 compute).
    """
    return "xla" if setting == "auto" else setting


def build_network(c: ml_collections.ConfigDict) -> MultiCropNetwork:
    """g = head o backbone. Stochastic depth acts only in `train=True` calls (the student's);
    the teacher is called with train=False, as it has no drop path in the official code."""
    m = c.model
    compute = jnp.dtype(m.compute_dtype)
    params = jnp.dtype(m.param_dtype)
    backbone = build_backbone(
        m,
        img_size=c.aug.global_size,
        dtype=compute,
        param_dtype=params,
        attention_impl=attention_implementation(m.attention),
        attention_pad=m.attention_pad,
    )
    head = DINOHead(
        out_dim=m.out_dim,
        use_bn=m.use_bn_in_head,
        nlayers=m.head_nlayers,
        hidden_dim=m.head_hidden_dim,
        bottleneck_dim=m.head_bottleneck_dim,
        dtype=compute,
        param_dtype=params,
    )
    patch_head = None
    if c.dino.ibot_weight and c.dino.ibot_separate_head:
        # DINOv2's ibot_head: the DINO head's sizes, its own prototypes
        patch_head = head.clone(out_dim=c.dino.ibot_out_dim or m.out_dim)
    return MultiCropNetwork(backbone=backbone, head=head, patch_head=patch_head)


def step_masks(c: ml_collections.ConfigDict, backbone) -> StepMasks | None:
    """The iBOT masks of a run's steps (None without iBOT): DINOv2's block masking on the
    global crops' patch grid, drawn per chunk of the global batch."""
    d = c.dino
    if not d.ibot_weight:
        return None
    generator = dinov2_masking_generator(c.aug.global_size, size_multiple(backbone))
    return StepMasks(
        generator=generator,
        batch_size=c.optim.batch_size,
        seed=c.seed,
        n_global_crops=2,
        mask_ratio_tuple=tuple(d.ibot_mask_ratio),
        mask_probability=d.ibot_mask_probability,
        chunks=d.ibot_chunks,
    )


def build_schedules(c: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedules:
    o, d = c.optim, c.dino
    return Schedules(
        steps_per_epoch=steps_per_epoch,
        epochs=o.epochs,
        base_lr=o.lr * o.batch_size / 256.0,  # linear scaling rule
        min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=d.momentum_teacher,
        teacher_temp=d.teacher_temp,
        warmup_teacher_temp=d.warmup_teacher_temp,
        warmup_teacher_temp_epochs=d.warmup_teacher_temp_epochs,
        freeze_last_layer=o.freeze_last_layer,
    )


def build_optimizer(c: ml_collections.ConfigDict, schedules: Schedules):
    return dino_optimizer(
        schedules,
        optimizer=c.optim.optimizer,
        clip_grad=c.optim.clip_grad,
        norm_last_layer=c.model.norm_last_layer,
        branch_updates=c.optim.branch_updates,
    )


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything static about a configured run once its epoch length is known."""

    hp: DinoHParams  # network, optimiser, schedules, loss temperatures
    aug: MultiCropConfig
    compute_dtype: jnp.dtype
    masks: StepMasks | None = None  # iBOT's masks of each step, drawn on the host

    def sample_crops(self) -> tuple[jax.Array, ...]:
        return sample_crops(self.aug, self.compute_dtype)

    def init_state(self, key: jax.Array) -> TrainState:
        state = init_state(self.hp.model, self.hp.tx, self.sample_crops(), key)
        return state.replace(extras=self.initial_extras(state))

    def abstract_state(self) -> TrainState:
        return jax.eval_shape(self.init_state, jax.random.key(0))

    def initial_extras(self, state: TrainState) -> dict:
        """The optional pieces' state at step 0: iBOT's patch center (zeros, as the official
        buffer) and the Gram teacher (the initial teacher backbone; replaced from the EMA
        teacher at dino.gram_start_step)."""
        extras = {}
        model = self.hp.model
        if self.masks is not None:
            head = model.head if model.patch_head is None else model.patch_head
            extras["patch_center"] = jnp.zeros((1, head.out_dim), jnp.float32)
        if self.hp.gram is not None:
            extras["gram_teacher"] = jax.tree.map(jnp.copy, state.teacher["backbone"])
        return extras


def with_flat_state(built: Recipe, c: ml_collections.ConfigDict, student: Any) -> Recipe:
    """`built` stepping with the flat groups of optim.flat_state (dino_jax.optim_flat);
    `student`: the student's params or their shapes."""
    flat = flat_optimizer(
        student,
        built.hp.schedules,
        optimizer=c.optim.optimizer,
        clip_grad=c.optim.clip_grad,
        norm_last_layer=c.model.norm_last_layer,
        branch_updates=c.optim.branch_updates,
    )
    return dataclasses.replace(built, hp=dataclasses.replace(built.hp, flat=flat))


def build(
    c: ml_collections.ConfigDict, steps_per_epoch: int, objective: Objective | None = None
) -> Recipe:
    """The recipe of a validated config (dino_jax.validation.validate) for epochs of that
    length; `objective` replaces the configured one (`config.dino`) when given."""
    schedules = build_schedules(c, steps_per_epoch)
    d = c.dino
    model = build_network(c)
    hp = DinoHParams(
        model=model,
        tx=build_optimizer(c, schedules),
        schedules=schedules,
        objective=objective_from_config(d) if objective is None else objective,
        center_momentum=d.center_momentum,
        ibot_chunks=d.ibot_chunks if d.ibot_weight else None,
        gram=GramRefresh(d.gram_start_step, d.gram_update_every) if d.gram_weight else None,
        branch_updates=c.optim.branch_updates,
        wait_for_gradient=c.optim.wait_for_gradient,
        loss_chunks=d.loss_chunks,
    )
    aug = MultiCropConfig.from_config(c.aug)
    masks = step_masks(c, model.backbone)
    return Recipe(hp, aug, jnp.dtype(c.model.compute_dtype), masks)

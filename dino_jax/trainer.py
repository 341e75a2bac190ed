"""The training loop: data, restore or init, compile once, step, log, checkpoint, evaluate."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dino_jax import compilation_cache, parallel, recipe
from dino_jax.checkpoint import Checkpointer, check_work_dir
from dino_jax.checkpoint_resume import CheckpointError, check_resume_config
from dino_jax.config import default_config, flatten_config
from dino_jax.data import pipeline
from dino_jax.data.decode import SkipLog
from dino_jax.data.masking import with_step_masks
from dino_jax.evaluate.during_training import TrainingEvaluator
from dino_jax.final_evaluation import FINAL, read_final, write_final
from dino_jax.metrics_log import MetricLogger
from dino_jax.objective import Objective
from dino_jax.preemption import Preemption
from dino_jax.run_start import preflight, resumable_stream, skip_log
from dino_jax.starting_state import initial_state
from dino_jax.state import TrainState
from dino_jax.step_checks import (
    NonFiniteLossError,
    StepChecks,
    nonfinite,
    nonfinite_message,
    per_step_guard,
)
from dino_jax.train_step import DinoHParams, train_step
from dino_jax.workdir import WorkdirLock

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    status: str  # "finished" | "preempted" | "max_steps"
    steps_per_epoch: int
    metrics: dict[str, float]
    # what compiling cost in this start (compilation_cache.CompileTimes.summary)
    compiled: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Run:
    """Everything static about a run, built once from the config before any compute."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    data: pipeline.TrainData
    recipe: recipe.Recipe
    abstract_state: Any
    state_sharding: Any
    skips: SkipLog

    @property
    def hp(self) -> DinoHParams:
        return self.recipe.hp

    def host_batches(self):
        """This process's batches from the data's start step, each with the step's iBOT
        masks when the recipe draws them (dino_jax.data.masking.with_step_masks)."""
        batches = iter(self.data)
        if self.recipe.masks is None:
            return batches
        return with_step_masks(
            batches,
            self.recipe.masks,
            self.data.start_step,
            jax.process_index(),
            jax.process_count(),
        )

    @functools.cached_property
    def step_sharding(self):
        """The shardings of the state the step takes: `state_sharding`, or with
        optim.flat_state those of its flat groups (replicated)."""
        if self.hp.flat is None:
            return self.state_sharding
        flat = jax.eval_shape(self.hp.flat.to_flat, self.abstract_state)
        return parallel.state_shardings(flat, self.mesh, fsdp=False)

    def to_step(self, state: TrainState) -> TrainState:
        """A per-tensor state (initial or restored) in the layout the step takes."""
        if self.hp.flat is None:
            return state
        mismatched = self.hp.flat.count_mismatches(state)
        if mismatched:
            raise CheckpointError(
                f"optim.flat_state keeps one step count per group of tensors, and the state's"
                f" tensors in {', '.join(mismatched)} have different counts: resume it with"
                " optim.flat_state=False"
            )
        return self._flatten(state)

    def to_tree(self, state: TrainState) -> TrainState:
        """The step's state per tensor, as checkpoints and evaluations take it (a copy)."""
        return state if self.hp.flat is None else self._unflatten(state)

    @functools.cached_property
    def _flatten(self):
        return jax.jit(self.hp.flat.to_flat, out_shardings=self.step_sharding)

    @functools.cached_property
    def _unflatten(self):
        return jax.jit(self.hp.flat.to_tree, out_shardings=self.state_sharding)

    @property
    def restore_target(self):
        """The abstract state with its shardings: what a checkpoint is restored into."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.abstract_state,
            self.state_sharding,
        )


def build_run(
    config: ml_collections.ConfigDict,
    start_step: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    skips: SkipLog | None = None,
    data: pipeline.TrainData | None = None,
    objective: Objective | None = None,
) -> Run:
    """The static parts of a run of `config`, which must have passed validation.validate;
    `data`: its training stream if already opened (then start_step and skips are its own);
    `objective`: a user objective in place of the configured one (dino_jax.objective)."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.connect_processes(mesh)
    if data is None:
        data = pipeline.train_data(
            config.data,
            config.optim.batch_size,
            start_step=start_step,
            skips=SkipLog() if skips is None else skips,
        )
    built = recipe.build(config, data.steps_per_epoch, objective)
    abstract = built.abstract_state()
    if config.optim.flat_state:
        built = recipe.with_flat_state(built, config, abstract.student)
    shardings = parallel.state_shardings(abstract, mesh, config.train.fsdp)
    return Run(config, mesh, data, built, abstract, shardings, data.skips)


def _update(run: Run):
    """The run's train_step with its static arguments bound: (state, batch, base_key)."""
    return functools.partial(
        train_step,
        hp=run.hp,
        aug=run.recipe.aug,
        compute_dtype=run.recipe.compute_dtype,
        skip_nonfinite=run.config.train.skip_nonfinite_steps > 0,
    )


def compile_step(run: Run):
    """The jitted step: state donated and sharded, batch split on its first axis."""
    replicated = parallel.replicated(run.mesh)
    return jax.jit(
        _update(run),
        in_shardings=(run.step_sharding, parallel.batch_sharding(run.mesh), replicated),
        out_shardings=(run.step_sharding, replicated),
        donate_argnums=(0,),
    )


def compile_loop_step(run: Run):
    """The training loop's step: compile_step's, and a count of the non-finite steps kept on
    the device: (state, batch, base_key, count) -> (state, metrics, count'), count an int32
    scalar carried from step to step (not donated: the loop reads it late), so that a check
    every few steps still finds a non-finite step between two checks."""
    update = _update(run)

    def counted_train_step(state, batch, base_key, count):
        state, metrics = update(state, batch, base_key)
        return state, metrics, count + nonfinite(metrics)

    replicated = parallel.replicated(run.mesh)
    return jax.jit(
        counted_train_step,
        in_shardings=(
            run.step_sharding,
            parallel.batch_sharding(run.mesh),
            replicated,
            replicated,
        ),
        out_shardings=(run.step_sharding, replicated, replicated),
        donate_argnums=(0,),
    )


def restore_or_init(run: Run, ckpt: Checkpointer, flat_config: dict[str, Any]) -> TrainState:
    """The latest checkpoint's state if there is one (its config checked against
    `flat_config`), else a fresh one."""
    latest = ckpt.latest_step()
    if latest is None:
        return initial_state(run)
    meta = ckpt.read_meta(latest)
    allow = run.config.train.allow_config_change
    for key, old, new in check_resume_config(saved_config(meta), flat_config, allow):
        _LOG.warning("resuming with %s changed: %r -> %r", key, old, new)
    if meta.get("steps_per_epoch", run.data.steps_per_epoch) != run.data.steps_per_epoch:
        _LOG.warning(
            "the data changed since checkpoint %d: %s steps per epoch, now %d; the epoch-based"
            " schedules and the data order follow the new length",
            latest,
            meta["steps_per_epoch"],
            run.data.steps_per_epoch,
        )
    state = ckpt.restore(latest, run.restore_target)
    ckpt.record(latest, "restored")
    _LOG.info("resumed from step %d in %s", latest, ckpt.directory)
    return state


def saved_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The flattened config a checkpoint was written with. A key added to dino_jax after it
    was written reads as its default: every new option's default is the behaviour from
    before the option existed, so such a checkpoint resumes."""
    return {**flatten_config(default_config()), **meta.get("config", {})}


def train(
    config: ml_collections.ConfigDict, workdir: str, objective: Objective | None = None
) -> TrainResult:
    """Train (or resume) the configured run in `workdir`; see README for the layout.

    `objective`: a function of the step's outputs returning (loss, metrics) that replaces the
    configured objective (dino_jax.objective; docs/research.md). It is code, not config: a
    resume must pass the same one."""
    with Preemption() as preemption:
        return _train(config, workdir, preemption, objective)


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    preemption: Preemption,
    objective: Objective | None = None,
) -> TrainResult:
    mesh = parallel.make_mesh()
    # A user error is found before the work directory is created, read or locked.
    data = preflight(config, workdir, mesh)
    compilation_cache.configure(config.train.compilation_cache)  # before the step compiles
    # Held until the run ends: a second trainer on this directory is refused (workdir.py).
    with compilation_cache.CompileTimes() as compiled, WorkdirLock(workdir, jax.process_index()):
        result = _train_locked(config, workdir, preemption, mesh, data, objective)
    _LOG.info("%s", compiled.describe())
    return dataclasses.replace(result, compiled=compiled.summary())


def _train_locked(
    config: ml_collections.ConfigDict,
    workdir: str,
    preemption: Preemption,
    mesh: jax.sharding.Mesh,
    data: pipeline.TrainData,
    objective: Objective | None,
) -> TrainResult:
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    latest = ckpt.latest_step()
    check_work_dir(workdir, latest)
    start = latest or 0
    data = resumable_stream(data, start, skip_log(workdir))
    run = build_run(config, mesh=mesh, data=data, objective=objective)
    flat = flatten_config(config)
    state = restore_or_init(run, ckpt, flat)
    if int(jax.device_get(state.step)) != start:
        raise CheckpointError(f"restored step {int(state.step)} but expected {start}")
    spe = run.data.steps_per_epoch
    total = config.optim.epochs * spe
    last = total if config.train.max_steps is None else min(total, config.train.max_steps)
    done_before = read_final(workdir, total)
    if start == total and done_before is not None:
        # A finished run started again: nothing to train, save or evaluate a second time.
        _LOG.info("the run finished at step %d; its final evaluation is in %s", total, FINAL)
        return TrainResult(state=state, status="finished", steps_per_epoch=spe, metrics=done_before)
    meta = {"config": flat, "steps_per_epoch": spe}
    state = run.to_step(state)
    logger = MetricLogger(
        workdir,
        total_steps=last,
        start_step=start,
        images_per_step=config.optim.batch_size,
        log_every=config.train.log_every_steps,
        progress_bar=config.train.progress_bar,
    )
    step_fn = compile_loop_step(run)
    # on the mesh once: a key on one device would be copied to every device at every step
    base_key = parallel.on_every_device(lambda: jax.random.key(config.seed), run.mesh)
    evaluator = (
        TrainingEvaluator(config, run.recipe, run.mesh, workdir)
        if config.data.eval_test_split
        else None
    )
    status, metrics = "finished", {}
    checks = StepChecks(
        in_flight=config.train.steps_in_flight,
        log_every=config.train.log_every_steps,
        tolerated=config.train.skip_nonfinite_steps,
        logger=logger,
        skips=run.skips,
        ckpt=ckpt,
    )
    count = parallel.on_every_device(lambda: jnp.int32(0), run.mesh)  # non-finite steps so far

    def save(step: int, force: bool = False) -> None:
        # A finite loss and gradient can still give a non-finite update (an overflowing lr):
        # such a state would make every later resume start from garbage.
        if not bool(all_finite(state)):
            raise NonFiniteLossError(nonfinite_message(step - 1, {}, ckpt, "update"))
        ckpt.save(run.to_tree(state), {**meta, "step": step}, force=force)

    batches = pipeline.device_batches(run.host_batches(), run.mesh, config.data.prefetch)
    try:
        for step in range(start, last):
            if preemption.requested and step == start:
                status = "preempted"  # SIGTERM while starting up: nothing new to save
                break
            with per_step_guard():
                state, device_metrics, count = step_fn(state, next(batches), base_key, count)
                metrics = checks.dispatched(step, device_metrics, count) or metrics
                logger.advance(step + 1)
                stop = preemption.stop_after(step)
            done = step + 1
            if stop or done % config.train.checkpoint_every_steps == 0:
                metrics = checks.check() or metrics  # every step before it, finite
                save(done)
            if stop:
                status = "preempted"
                break
            if evaluator and done % spe == 0 and evaluator.due(done // spe):
                metrics = checks.check() or metrics
                logger.record(done, evaluator(run.to_tree(state), done // spe))
        metrics = checks.check() or metrics
        if status != "preempted":
            status = "finished" if last == total else "max_steps"
            if start < last:
                save(last, force=True)
        ckpt.wait()
        logger.end_progress()
        if status == "finished":
            final = (
                evaluator(run.to_tree(state), config.optim.epochs, final=True) if evaluator else {}
            )
            logger.record(last, final)
            metrics.update(final)
            write_final(workdir, total, metrics)
    finally:
        ckpt.wait()
        logger.close()
    return TrainResult(
        state=run.to_tree(state), status=status, steps_per_epoch=spe, metrics=metrics
    )


@jax.jit
def all_finite(state: TrainState) -> jax.Array:
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in floats]))

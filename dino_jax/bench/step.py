"""Benchmark of the compiled training step: images/s, FLOPs, MFU, compile time, memory.

dino-jax-bench step [--config=vit_small16] [--config.section.key=v ...] [--batch 128]
    [--steps 10] [--warmup 3] [--variant "model.gelu=tanh,aug.window=True" ...] [--profile DIR]

Synthetic canvases already on the device (no host pipeline), the real step otherwise:
on-device multi-crop augmentation, teacher and student forward, backward, optimiser, EMA.
Each setting (the --config one first, then one per --variant: its comma-separated overrides
on top of it) is compiled and timed in this process, and printed as one JSON line:

  images_per_s_pipelined  --steps steps queued with no host sync, one wait at the end (what
                          the training loop, with steps in flight, gets)
  images_per_s_synced     the median of --steps steps, each waited for
  gflop_per_image         analytic FLOPs per source image; xla_gflop_per_image: XLA's count
  mfu                     the pipelined FLOP rate over a large matmul's, timed in this process
  compile_s, peak_gib     compile time; the device's peak memory since the process started
                          ("n/a" where the backend keeps none), and xla_peak_gib, XLA's peak
                          for this setting's program alone (per device)

A setting refused by its config, or failing while compiling or running (a kernel refusing a
shape, say), prints a JSON line with its "error"; the others still run. --profile DIR traces
a few steps of the first setting into DIR and prints where the device time goes, grouped into
matmul, attention, norm+elementwise, augmentation, optimizer+EMA, head+loss and other
(DIR/profile.json; the trace, for Perfetto or TensorBoard, under DIR/plugins/profile).

Exit status: 0 every setting measured, or --help; 1 a setting failed while compiling or running
(its JSON line has the error, stderr the traceback); 2 a user error (command line, config, an
unusable init_from file), with a message, found before anything is compiled: a refused
--variant is reported and skipped, then exits 2 once the others are measured.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import shlex
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import ml_collections

from dino_jax import cli, recipe
from dino_jax.bench import hlo_copies, hlo_groups
from dino_jax.bench.flops import dino_flops_per_image


def matmul_rate(dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a size^3 matmul in `dtype` on the default device (median of repeats)."""
    x = jax.random.normal(jax.random.key(0), (size, size), dtype)
    y = jax.random.normal(jax.random.key(1), (size, size), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(x, y).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(x, y).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


@functools.cache
def reference_rate(dtype_name: str) -> float:
    """The matmul rate MFU is measured against: 8192^3 on an accelerator, 1024^3 on a CPU
    (where MFU means little), measured once per process and dtype."""
    size = 1024 if jax.default_backend() == "cpu" else 8192
    return matmul_rate(jnp.dtype(dtype_name), size)


def xla_flops(compiled) -> float | None:
    """XLA's own FLOP count of a compiled function (None where the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def xla_peak_bytes(compiled) -> float | None:
    """XLA's peak device memory of one call of a compiled function (per device; arguments,
    outputs and temporaries), None where the backend gives no memory analysis."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if stats is None:
        return None
    peak = getattr(stats, "peak_memory_in_bytes", 0)
    if not peak:
        peak = (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes
        )
    return float(peak)


def gib_or_na(num_bytes: float | None):
    """Bytes in GiB, or "n/a" where not measured (0 would read as a measurement)."""
    return "n/a" if num_bytes is None else num_bytes / 2**30


@dataclasses.dataclass
class Setting:
    """One configuration to measure: its name ("base" or the --variant text), the overrides
    that make it from the recipe (as given: key -> text) and the config they give."""

    name: str
    overrides: dict[str, str]
    config: ml_collections.ConfigDict


# a comma followed by `section.key=` (or by a bare `section.key`, a forgotten value)
_ITEM_START = re.compile(r",\s*(?=(?:--config\.)?[A-Za-z_]\w*(?:\.\w+)+\s*(?:=|,|$))")


def parse_variant(text: str) -> list[tuple[str, str]]:
    """ "model.gelu=tanh,aug.window=True" -> [("model.gelu", "tanh"), ("aug.window", "True")].

    Items are split at the commas that start a `section.key` (so a tuple or list value keeps
    its commas: "aug.global_scale=(0.4, 1.0)", "eval.knn_ks=10,20"); a leading --config. is
    allowed. ConfigError for an item that is not section.key=value."""
    pairs, bad = [], []
    for item in _ITEM_START.split(text.strip()):
        key, has_value, value = item.strip().removeprefix(cli.PREFIX).partition("=")
        if not has_value or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", key.strip()):
            bad.append(item.strip())
        pairs.append((key.strip(), value.strip()))
    if bad or not text.strip():
        raise cli.ConfigError(
            f"--variant {text!r}: give comma-separated section.key=value overrides"
            f' (e.g. --variant "model.gelu=tanh,aug.window=True"); not one: {bad or [text]}'
        )
    return pairs


def build_settings(base: ml_collections.ConfigDict, overrides, variants) -> list[Setting]:
    """The base setting (`base`, made by `overrides`), then one per --variant text; every
    variant's keys and values are checked (ConfigError naming each problem)."""
    settings = [Setting("base", dict(overrides), base)]
    errors = []
    for text in variants:
        try:
            pairs = parse_variant(text)
            config = copy.deepcopy(base)
            cli.apply_overrides(config, pairs)
        except cli.ConfigError as err:
            errors.append(str(err).removeprefix("invalid command line:\n  - "))
            continue
        settings.append(Setting(text, {**overrides, **dict(pairs)}, config))
    if errors:
        raise cli.ConfigError("invalid --variant:\n  - " + "\n  - ".join(errors))
    return settings


def bench_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` fed from the in-memory synthetic source (1,000 steps per epoch for the
    schedules), validated; ConfigError / CheckpointError as training would refuse it."""
    from dino_jax.starting_state import check_init_from
    from dino_jax.validation import validate

    config = config.copy_and_resolve_references()
    config.data.source = "synthetic"
    config.data.synthetic_examples = 1000 * config.optim.batch_size
    config.data.synthetic_classes = max(config.data.synthetic_classes, 1)
    validate(config, jax.device_count(), jax.process_count(), jax.default_backend())
    check_init_from(config)
    return config


def timed_steps(compiled, state, batch, key, steps: int, synced: bool):
    """`steps` calls of `compiled`: (new state, last metrics, seconds per step). Synced: each
    step waited for, the median; else all queued, one wait at the end, the mean."""
    if not steps:
        return state, None, 0.0
    times, metrics = [], None
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, key)
        if synced:
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
    if synced:
        return state, metrics, statistics.median(times)
    jax.block_until_ready((state, metrics))
    return state, metrics, (time.perf_counter() - start) / steps


def run(config, steps: int, warmup: int, profile_dir: str | None = None) -> dict:
    """The figures of one setting (`config` from bench_config): compile, warm up, time
    synced then pipelined steps, read the memory; with `profile_dir`, then trace a few more
    steps and group their device time."""
    from dino_jax.data.pipeline import to_global
    from dino_jax.starting_state import initial_state
    from dino_jax.trainer import build_run, compile_step

    train_run = build_run(config)
    state, step = train_run.to_step(initial_state(train_run)), compile_step(train_run)
    batch = to_global(next(train_run.host_batches()), train_run.mesh)
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    state, _, _ = timed_steps(compiled, state, batch, key, warmup, synced=False)
    state, _, synced_s = timed_steps(compiled, state, batch, key, steps, synced=True)
    state, metrics, pipelined_s = timed_steps(compiled, state, batch, key, steps, synced=False)
    batch_size = config.optim.batch_size
    flops = dino_flops_per_image(config)
    rate = reference_rate(config.model.compute_dtype)
    achieved = flops * batch_size / pipelined_s / jax.device_count()
    stats = jax.devices()[0].memory_stats() or {}
    xla = xla_flops(compiled)
    text = compiled.as_text()
    result = {
        "arch": config.model.arch,
        "patch": config.model.patch_size,
        "batch": batch_size,
        "crops": f"{config.aug.n_global}x{config.aug.global_size}"
        f" + {config.aug.n_local}x{config.aug.local_size}",
        "dtype": config.model.compute_dtype,
        "attention": recipe.attention_implementation(config.model.attention),
        "steps": steps,
        "images_per_s_pipelined": batch_size / pipelined_s,
        "images_per_s_synced": batch_size / synced_s,
        "step_ms_pipelined": 1e3 * pipelined_s,
        "step_ms_synced": 1e3 * synced_s,
        "gflop_per_image": flops / 1e9,
        "xla_gflop_per_image": "n/a" if xla is None else xla / batch_size / 1e9,
        "tflops_per_device": achieved / 1e12,
        "matmul_tflops": rate / 1e12,
        "mfu": achieved / rate,
        "compile_s": compile_s,
        "peak_gib": gib_or_na(stats.get("peak_bytes_in_use")),
        "xla_peak_gib": gib_or_na(xla_peak_bytes(compiled)),
        **hlo_copies.summary(text),
        "optimizer_ops": hlo_groups.entry_ops(text)["optimizer+EMA"],
        "loss": float(metrics["train/loss"]),
    }
    if profile_dir is not None:
        result["profile"] = profiled(compiled, state, batch, key, profile_dir)
    return result


def profiled(compiled, state, batch, key, profile_dir: str) -> dict:
    """Trace a few steps into `profile_dir`: the group shares, or why there are none (a
    profiler that cannot start, say, leaves the figures already measured)."""
    from dino_jax.bench.profile import format_summary, profile_steps

    try:
        _, summary = profile_steps(compiled, state, batch, key, profile_dir)
    except (*SETTING_FAILURES, OSError) as err:
        traceback.print_exc()
        return {"dir": str(profile_dir), "error": f"{type(err).__name__}: {err}"}
    print(format_summary(summary), file=sys.stderr)
    shares = {g: round(v["share"], 4) for g, v in summary["groups"].items()}
    kernels = {g: v["kernels_per_step"] for g, v in summary["groups"].items()}
    return {"dir": str(profile_dir), "shares": shares, "kernels_per_step": kernels}


def identity(setting: Setting, recipe_name: str, recipe_text: str) -> dict:
    """What every JSON line starts with: the setting, the command that runs it alone (the
    recipe as given: `recipe_text`), the device and JAX's version."""
    device = jax.devices()[0]
    flags = [f"--config={recipe_text}"] + [
        f"{cli.PREFIX}{k}={v}" for k, v in setting.overrides.items()
    ]
    return {
        "setting": setting.name,
        "config": recipe_name,
        "overrides": setting.overrides,
        "command": shlex.join(["dino-jax-bench", "step", *flags]),
        "device": f"{jax.device_count()} x {device.device_kind}",
        "platform": device.platform,
        "jax": jax.__version__,
    }


def error_line(
    setting: Setting, recipe_name: str, recipe_text: str, stage: str, err: BaseException
) -> dict:
    """The JSON line of a setting that was refused ("config") or failed ("run"); a long
    message (XLA's can hold a whole program) cut to its first 2,000 characters."""
    message = f"{type(err).__name__}: {str(err).strip()}"[:2000]
    return {**identity(setting, recipe_name, recipe_text), "stage": stage, "error": message}


# What a setting that cannot compile or run raises (JAX's runtime errors, a kernel refusing a
# shape, running out of memory, a speed option that is not wired yet): reported, not fatal.
SETTING_FAILURES = (RuntimeError, ValueError, TypeError, LookupError, ArithmeticError)


def build_parser():
    parser = cli.parser("dino-jax-bench step", __doc__)
    parser.add_argument("--batch", type=int, default=None, help="global batch (images)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, synced and queued")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=V,KEY=V",
        help="another setting: these overrides on top of the --config ones (repeatable)",
    )
    parser.add_argument(
        "--profile", metavar="DIR", default=None, help="trace the first setting into DIR"
    )
    return parser


def argument_errors(args) -> list[str]:
    """What is wrong with the options other than --config."""
    errors = []
    if args.batch is not None and args.batch < 1:
        errors.append(f"--batch {args.batch}: at least 1 image")
    if args.steps < 1:
        errors.append(f"--steps {args.steps}: at least 1 timed step")
    if args.warmup < 0:
        errors.append(f"--warmup {args.warmup}: 0 or more steps")
    return errors


def emit(result: dict) -> None:
    """One setting's result: its figures as text on stderr, its JSON line on stdout."""
    width = max(map(len, result))
    for key, value in result.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}", file=sys.stderr)
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure every setting; the results (figures or errors) in order. Where one failed
    (or was refused), all the others are measured first, then SystemExit 1 (or 2)."""
    from dino_jax.checkpoint_resume import CheckpointError
    from dino_jax.config import ConfigError
    from dino_jax.data.sources import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = cli.parse_command(build_parser, argv, default_recipe="vit_small16")
    recipe_text = cli.split_config_args(argv)[1] or cmd.recipe  # as given: a name or a path
    errors = argument_errors(cmd.args)
    if errors:
        cli.fail(cmd.prog, "invalid command line:\n  - " + "\n  - ".join(errors))
    overrides = dict(cmd.overrides)
    if cmd.args.batch is not None:
        cmd.config.optim.batch_size = cmd.args.batch
        overrides["optim.batch_size"] = str(cmd.args.batch)
    try:
        settings = build_settings(cmd.config, overrides, cmd.args.variant)
    except ConfigError as err:
        cli.fail(cmd.prog, str(err))
    prepared, refused = [], 0
    for setting in settings:  # every config checked before anything is compiled
        try:
            prepared.append(bench_config(setting.config))
        except (ConfigError, CheckpointError, DataError) as err:
            if setting.name == "base":
                cli.fail(cmd.prog, str(err))
            print(f"{cmd.prog}: --variant {setting.name!r} refused: {err}", file=sys.stderr)
            prepared.append(err)
            refused += 1
    results, failed = [], 0
    for i, (setting, config) in enumerate(zip(settings, prepared, strict=True)):
        if isinstance(config, Exception):
            result = error_line(setting, cmd.recipe, recipe_text, "config", config)
        else:
            try:
                profile_dir = cmd.args.profile if i == 0 else None
                measured = run(config, cmd.args.steps, cmd.args.warmup, profile_dir)
                result = {**identity(setting, cmd.recipe, recipe_text), **measured}
            except SETTING_FAILURES as err:  # reported in its line; the others still run
                traceback.print_exc()
                result = error_line(setting, cmd.recipe, recipe_text, "run", err)
                failed += 1
        emit(result)
        results.append(result)
    if failed or refused:
        raise SystemExit(cli.UNEXPECTED if failed else cli.USER_ERROR)
    return results


if __name__ == "__main__":
    main()

"""Benchmark of the compiled training step: images/s, FLOPs, MFU, compile time, memory.

dino-jax-bench step [--config=vit_small16] [--batch 128] [--steps 20] [--config.section.key=v]

Synthetic canvases already on the device (no host pipeline), the real step otherwise:
on-device multi-crop augmentation, teacher and student forward, backward, optimiser, EMA.
MFU is the achieved FLOP rate over the rate of a large matmul measured in the same run.

Exit status: 0 done, or --help; 1 an unexpected error (a traceback); 2 a user error (command
line, config, an unusable init_from file), with a message, found before anything is compiled.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from dino_jax import cli, recipe
from dino_jax.models.backbones import family, vit_sizes


def vit_forward_flops(dim: int, depth: int, tokens: int, patch: int, mlp_ratio: float = 4.0):
    """Matmul FLOPs of one ViT forward on one image of `tokens` (CLS included) tokens."""
    per_block = (
        2 * tokens * dim * 3 * dim  # qkv
        + 2 * 2 * tokens * tokens * dim  # q k^T and attn v
        + 2 * tokens * dim * dim  # proj
        + 2 * 2 * tokens * dim * int(dim * mlp_ratio)  # fc1, fc2
    )
    patch_embed = 2 * (tokens - 1) * 3 * patch * patch * dim
    return depth * per_block + patch_embed


def head_forward_flops(dim: int, nlayers: int, hidden: int, bottleneck: int, out_dim: int):
    widths = [dim] + [hidden] * (nlayers - 1) + [bottleneck]
    mlp = sum(2 * a * b for a, b in itertools.pairwise(widths))
    return mlp + 2 * bottleneck * out_dim


def backbone_forward_flops(config, size: int) -> float:
    """FLOPs of one backbone forward on one size x size crop: analytic for a ViT; for a
    ResNet or XCiT the count XLA makes of the lowered (not compiled) forward."""
    m = config.model
    if family(m.arch) == "vit":
        arch = vit_sizes(m)
        tokens = (size // m.patch_size) ** 2 + 1
        return vit_forward_flops(arch["embed_dim"], arch["depth"], tokens, m.patch_size)
    backbone = recipe.build_network(config).backbone
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(backbone.init, jax.random.key(0), image)
    lowered = jax.jit(lambda v, x: backbone.apply(v, x).feature).lower(variables, image)
    return float(lowered.cost_analysis()["flops"])


def dino_flops_per_image(config) -> float:
    """Analytic FLOPs of one training step per source image: the student's forward and
    backward (3x forward) on every crop and the teacher's forward on the global crops."""
    m, a = config.model, config.aug
    dim = recipe.build_network(config).backbone.embed_dim
    head = head_forward_flops(
        dim, m.head_nlayers, m.head_hidden_dim, m.head_bottleneck_dim, m.out_dim
    )

    def crop(size):
        return backbone_forward_flops(config, size) + head

    student = a.n_global * crop(a.global_size) + a.n_local * crop(a.local_size)
    teacher = a.n_global * crop(a.global_size)
    return 3 * student + teacher


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


def xla_flops(compiled) -> float | None:
    """XLA's own FLOP count of a compiled function (None where the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def run(config, steps: int, warmup: int) -> dict:
    from dino_jax.data.pipeline import to_global
    from dino_jax.starting_state import check_init_from
    from dino_jax.trainer import build_run, compile_step, initial_state

    # The trainer's own state and compiled step, fed from the in-memory synthetic source
    # (1,000 steps per epoch for the schedules).
    config = config.copy_and_resolve_references()
    config.data.source = "synthetic"
    config.data.synthetic_examples = 1000 * config.optim.batch_size
    config.data.synthetic_classes = max(config.data.synthetic_classes, 1)
    from dino_jax.validation import validate

    validate(config, jax.device_count(), jax.process_count(), jax.default_backend())
    check_init_from(config)
    train_run = build_run(config)
    state, step = initial_state(train_run), compile_step(train_run)
    batch = to_global(next(train_run.host_batches()), train_run.mesh)
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state, _ = compiled(state, batch, key)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    images_s = config.optim.batch_size / step_s
    flops = dino_flops_per_image(config)
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    rate = matmul_rate(jnp.dtype(config.model.compute_dtype), 8192 if on_gpu else 2048)
    achieved = flops * images_s / jax.device_count()
    stats = device.memory_stats() or {}
    return {
        "device": f"{jax.device_count()} x {device.device_kind}",
        "arch": config.model.arch,
        "patch": config.model.patch_size,
        "batch": config.optim.batch_size,
        "crops": f"{config.aug.n_global}x{config.aug.global_size}"
        f" + {config.aug.n_local}x{config.aug.local_size}",
        "dtype": config.model.compute_dtype,
        "attention": recipe.attention_implementation(config.model.attention),
        "step_ms": 1e3 * step_s,
        "images_per_s": images_s,
        "gflop_per_image": flops / 1e9,
        "xla_gflop_per_image": (xla_flops(compiled) or 0.0) / config.optim.batch_size / 1e9,
        "tflops_per_device": achieved / 1e12,
        "matmul_tflops": rate / 1e12,
        "mfu": achieved / rate,
        "compile_s": compile_s,
        # None where the backend keeps no memory statistics (CPU): 0 would read as a measurement.
        "peak_memory_gb": (
            stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None
        ),
        "loss": float(metrics["train/loss"]),
    }


def build_parser():
    parser = cli.parser("dino-jax-bench step", __doc__)
    parser.add_argument("--batch", type=int, default=None, help="global batch (images)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
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


def main(argv: list[str] | None = None) -> dict:
    cmd = cli.parse_command(build_parser, argv, default_recipe="vit_small16")
    config = cmd.config
    errors = argument_errors(cmd.args)
    if errors:
        cli.fail(cmd.prog, "invalid command line:\n  - " + "\n  - ".join(errors))
    if cmd.args.batch is not None:
        config.optim.batch_size = cmd.args.batch
    from dino_jax.checkpoint import CheckpointError
    from dino_jax.config import ConfigError
    from dino_jax.data.sources import DataError

    try:
        result = run(config, cmd.args.steps, cmd.args.warmup)
    except (ConfigError, CheckpointError, DataError) as err:
        cli.fail(cmd.prog, str(err))
    width = max(map(len, result))
    for key, value in result.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

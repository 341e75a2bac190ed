"""Train DINO: `dino-jax-train [--config=NAME|FILE] [--workdir=DIR] [--config.section.key=v]`.

Without arguments it trains the demo recipe into workdirs/demo, resuming if that directory
already holds checkpoints. Recipes: configs/*.py, by name (`--config=vit_small16`) or path.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dino_jax import cli

PROG = "dino-jax-train"
DEFAULT_RECIPE = "demo"
_LOG = logging.getLogger("dino_jax.train")


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(PROG, __doc__)
    p.add_argument(
        "--workdir", default=None, help="checkpoints and logs (default: workdirs/<recipe>)"
    )
    p.add_argument(
        "--coordinator_address",
        default=None,
        help="host:port of process 0 for multi-host runs outside TPU pods and SLURM (which JAX"
        " detects)",
    )
    p.add_argument("--num_processes", type=int, default=None, help="processes in the run")
    p.add_argument("--process_id", type=int, default=None, help="this process's index")
    p.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() (auto-detect)"
    )
    p.add_argument(
        "--heartbeat_timeout_seconds",
        type=int,
        default=100,
        help="multi-host: a process silent for this long counts as dead, and every other process"
        " stops with an error instead of waiting for it forever in a collective",
    )
    p.add_argument(
        "--initialization_timeout",
        type=int,
        default=300,
        help="multi-host: seconds to wait for every process to join",
    )
    p.add_argument(
        "--checkpoint_info_logs",
        action="store_true",
        help="show Orbax's INFO messages (every file of every save); warnings always show",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    cmd = cli.parse_command(build_parser, argv, default_recipe=DEFAULT_RECIPE)
    config = cmd.config
    args = cmd.args
    cli.setup_logging(show_orbax_info=args.checkpoint_info_logs)
    import jax

    if args.coordinator_address or args.distributed:
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=args.initialization_timeout,
            heartbeat_timeout_seconds=args.heartbeat_timeout_seconds,
        )
    from dino_jax.checkpoint import CheckpointError
    from dino_jax.config import ConfigError
    from dino_jax.data.sources import DataError
    from dino_jax.trainer import NonFiniteLossError, train

    workdir = args.workdir or os.path.join("workdirs", cmd.recipe)
    _LOG.info("config %s, workdir %s, devices %s", cmd.recipe, workdir, jax.devices())
    try:
        result = train(config, workdir)
    except (ConfigError, CheckpointError, DataError) as err:
        _LOG.error("%s", err)
        sys.exit(cli.USER_ERROR)
    except NonFiniteLossError as err:
        _LOG.error("%s", err)
        sys.exit(3)
    _LOG.info("%s at step %d", result.status, int(result.state.step))
    if "knn/top1" in result.metrics and jax.process_index() == 0:
        print(knn_report(result.metrics, config))


def knn_report(metrics: dict, config) -> str:
    """The closing lines of a run: k-NN top-1 (k = 20) and, when computed, its baselines."""
    split = config.data.eval_test_split
    lines = [f"k-NN top-1 (k=20) on the {split} split: {metrics['knn/top1']:.2f}%"]
    for key, what in [
        ("knn_random_init/top1", "the same network at its random initialisation"),
        ("knn_pixels/top1", "raw pixels"),
    ]:
        if key in metrics:
            lines.append(f"  {what}: {metrics[key]:.2f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

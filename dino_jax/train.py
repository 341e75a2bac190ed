"""Train DINO: `dino-jax-train [--config=NAME|FILE] [--workdir=DIR] [--config.section.key=v]`.

Without arguments it trains the demo recipe into workdirs/demo, resuming if that directory
already holds checkpoints. Recipes: configs/*.py, by name (`--config=vit_small16`) or path.

Exit status: 0 finished, reached train.max_steps, or preempted after saving; 1 an unexpected
error (a traceback); 2 a user error (command line, config, data, checkpoint, an unusable work
directory or one another trainer holds), with a message; 3 a non-finite loss or update; 4 a
save failed (disk full, I/O error); 134 multi-host: another process died.
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


def argument_errors(args: argparse.Namespace, workdir: str) -> list[str]:
    """What is wrong with the options other than --config (the work directory included, read
    without touching it)."""
    from dino_jax.workdir import workdir_problem

    errors = []
    if args.workdir is not None and not args.workdir.strip():
        errors.append("--workdir is empty: name the directory for checkpoints and logs")
    elif problem := workdir_problem(workdir):
        errors.append(problem)
    distributed = args.coordinator_address or args.distributed
    for flag in ("num_processes", "process_id"):
        if getattr(args, flag) is not None and not distributed:
            errors.append(
                f"--{flag} is only read with --coordinator_address (or --distributed): add it"
            )
    if args.num_processes is not None and args.num_processes < 1:
        errors.append(f"--num_processes={args.num_processes}: at least 1")
    count = args.num_processes
    if args.process_id is not None and not 0 <= args.process_id < (count or args.process_id + 1):
        errors.append(f"--process_id={args.process_id}: use one in [0, --num_processes)")
    for flag in ("heartbeat_timeout_seconds", "initialization_timeout"):
        if getattr(args, flag) <= 0:
            errors.append(f"--{flag}={getattr(args, flag)}: a positive number of seconds")
    return errors


def exit_status(err: BaseException) -> int | None:
    """The documented exit status of an error that ends training; None for an unexpected one
    (a bug, which keeps its traceback)."""
    from dino_jax.checkpoint_resume import CheckpointError
    from dino_jax.checkpoint_storage import CheckpointSaveError
    from dino_jax.config import ConfigError
    from dino_jax.data.sources import DataError
    from dino_jax.trainer import NonFiniteLossError
    from dino_jax.workdir import WorkdirError

    if isinstance(err, CheckpointSaveError):  # a CheckpointError: test it first
        return cli.STORAGE_FAILED
    if isinstance(err, NonFiniteLossError):
        return cli.NON_FINITE
    if isinstance(err, (ConfigError, CheckpointError, DataError, WorkdirError)):
        return cli.USER_ERROR
    return None


def main(argv: list[str] | None = None) -> None:
    cmd = cli.parse_command(build_parser, argv, default_recipe=DEFAULT_RECIPE)
    config = cmd.config
    args = cmd.args
    workdir = args.workdir or os.path.join("workdirs", cmd.recipe)
    errors = argument_errors(args, workdir)
    if errors:
        cli.fail(PROG, "invalid command line:\n  - " + "\n  - ".join(errors))
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
    from dino_jax.trainer import train

    _LOG.info("config %s, workdir %s, devices %s", cmd.recipe, workdir, jax.devices())
    try:
        result = train(config, workdir)
    except Exception as err:
        from dino_jax.checkpoint_storage import storage_error

        # a full disk met by another write of the run (the logs, the skip list) counts as the
        # storage failing: status 4, one message naming the file and the last checkpoint
        err = (storage_error(err, workdir) or err) if isinstance(err, OSError) else err
        status = exit_status(err)
        if status is None:
            raise
        _LOG.error("%s", err)
        sys.exit(status)
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

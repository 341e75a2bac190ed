"""Train DINO: `python train.py [--config=configs/<recipe>.py] [--workdir=DIR] [--config.a.b=v]`.

Without arguments it trains the demo (configs/demo.py) into workdirs/demo, resuming if that
directory already holds checkpoints.
"""

import logging as std_logging
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

HERE = pathlib.Path(__file__).resolve().parent


def unknown_overrides(argv: list[str]) -> list[str]:
    """`--config.a.b=v` arguments that name no key of default_config(), with a suggestion.

    Checked before the flags are parsed: ml_collections would otherwise stop with a traceback.
    """
    from dino_jax.config import closest_key, default_config, flatten_config

    keys = list(flatten_config(default_config()))
    errors = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        name = arg.removeprefix("--config.").split("=", 1)[0]
        if name in keys or any(k.startswith(name + ".") for k in keys):
            continue
        close = closest_key(name, keys)
        hint = f"; did you mean --config.{close}?" if close else ""
        errors.append(f"{arg}: config.{name} is not a setting{hint}")
    return errors


if __name__ == "__main__" and (unknown := unknown_overrides(sys.argv[1:])):
    sys.exit("train.py: " + "\n".join(unknown) + "\n(every setting is in dino_jax/config.py)")

config_flags.DEFINE_config_file(
    "config", str(HERE / "configs" / "demo.py"), "Recipe file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Checkpoints and logs (default: workdirs/<recipe>).")
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 for multi-host runs outside TPU pods and SLURM (which JAX detects).",
)
flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run (with the address).")
flags.DEFINE_integer("process_id", None, "This process's index (with the address).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detect).")
flags.DEFINE_integer(
    "heartbeat_timeout_seconds",
    100,
    "Multi-host: a process silent for this long counts as dead, and every other process stops"
    " with an error instead of waiting for it forever in a collective.",
)
flags.DEFINE_bool(
    "checkpoint_info_logs",
    False,
    "Show Orbax's INFO messages (every file of every save); its warnings and errors always show.",
)
flags.DEFINE_integer(
    "initialization_timeout", 300, "Multi-host: seconds to wait for every process to join."
)


def below_warning_from_orbax(record: std_logging.LogRecord) -> bool:
    """False for Orbax's INFO/DEBUG records (a few dozen lines per checkpoint)."""
    return record.levelno < std_logging.WARNING and f"{os.sep}orbax{os.sep}" in record.pathname


def main(argv):
    del argv
    import jax

    if not flags.FLAGS.checkpoint_info_logs:
        logging.get_absl_handler().addFilter(lambda r: not below_warning_from_orbax(r))

    if flags.FLAGS.coordinator_address or flags.FLAGS.distributed:
        jax.distributed.initialize(
            coordinator_address=flags.FLAGS.coordinator_address,
            num_processes=flags.FLAGS.num_processes,
            process_id=flags.FLAGS.process_id,
            initialization_timeout=flags.FLAGS.initialization_timeout,
            heartbeat_timeout_seconds=flags.FLAGS.heartbeat_timeout_seconds,
        )
    from dino_jax.checkpoint import CheckpointError
    from dino_jax.config import ConfigError
    from dino_jax.data.sources import DataError
    from dino_jax.trainer import NonFiniteLossError, train

    config = flags.FLAGS.config
    recipe = pathlib.Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
    workdir = flags.FLAGS.workdir or os.path.join("workdirs", recipe)
    logging.info("config %s, workdir %s, devices %s", recipe, workdir, jax.devices())
    try:
        result = train(config, workdir)
    except (ConfigError, CheckpointError, DataError) as err:
        logging.error("%s", err)
        sys.exit(2)
    except NonFiniteLossError as err:
        logging.error("%s", err)
        sys.exit(3)
    logging.info("%s at step %d", result.status, int(result.state.step))
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
    app.run(main)

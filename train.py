"""Train DINO: `python train.py [--config=configs/<recipe>.py] [--workdir=DIR] [--config.a.b=v]`.

Without arguments it trains the demo (configs/demo.py) into workdirs/demo, resuming if that
directory already holds checkpoints.
"""

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

HERE = pathlib.Path(__file__).resolve().parent
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


def main(argv):
    del argv
    import jax

    if flags.FLAGS.coordinator_address or flags.FLAGS.distributed:
        jax.distributed.initialize(
            coordinator_address=flags.FLAGS.coordinator_address,
            num_processes=flags.FLAGS.num_processes,
            process_id=flags.FLAGS.process_id,
        )
    from dino_jax.trainer import NonFiniteLossError, train

    config = flags.FLAGS.config
    recipe = pathlib.Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
    workdir = flags.FLAGS.workdir or os.path.join("workdirs", recipe)
    logging.info("config %s, workdir %s, devices %s", recipe, workdir, jax.devices())
    try:
        result = train(config, workdir)
    except NonFiniteLossError as err:
        logging.error("%s", err)
        sys.exit(3)
    logging.info("%s at step %d", result.status, int(result.state.step))


if __name__ == "__main__":
    app.run(main)

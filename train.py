"""Train DINO from a checkout: `python train.py [--config=NAME|FILE] [--workdir=DIR]
[--config.section.key=value ...]`, the same command as `dino-jax-train` (dino_jax/train.py).

Without arguments it trains the demo (configs/demo.py) into workdirs/demo, resuming if that
directory already holds checkpoints.
"""

from dino_jax.train import main

if __name__ == "__main__":
    main()

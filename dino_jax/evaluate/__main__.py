"""`python -m dino_jax.evaluate`: the same command as `dino-jax-evaluate`."""

from dino_jax.evaluate.cli import main

if __name__ == "__main__":
    main()

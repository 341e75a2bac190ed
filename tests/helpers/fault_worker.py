"""A training process for the fault tests to kill: prints `START <step>` once restored and
`STATUS <status> <step>` at the end; `--save-delay S` holds each checkpoint S seconds before
Orbax renames it into place, so that a kill can land while the temporary directory exists."""

import argparse
import asyncio
import json
import pathlib
import sys

# the repository (for dino_jax) and tests/ (for helpers.*), found from this file's location
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
from orbax.checkpoint._src.path import atomicity

from dino_jax import trainer
from helpers.tiny import tiny_config


def delay_commits(seconds: float) -> None:
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self, *args, **kwargs):
        await asyncio.sleep(seconds)  # written, not yet renamed into place
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize


def report_start() -> None:
    restore_or_init = trainer.restore_or_init

    def reporting(*args, **kwargs):
        state = restore_or_init(*args, **kwargs)
        print(f"START {int(jax.device_get(state.step))}", flush=True)
        return state

    trainer.restore_or_init = reporting


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--overrides", default="{}", help="JSON {config key: value}")
    parser.add_argument("--save-delay", type=float, default=0.0)
    args = parser.parse_args()
    if args.save_delay:
        delay_commits(args.save_delay)
    report_start()
    result = trainer.train(tiny_config(**json.loads(args.overrides)), args.workdir)
    print(f"STATUS {result.status} {int(result.state.step)}", flush=True)


if __name__ == "__main__":
    main()

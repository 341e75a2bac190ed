"""`dino-jax-bench {step,augment,pipeline,predict,profile,report} [options]` (or
`python -m dino_jax.bench`): the project's benchmarks."""

import importlib
import sys

COMMANDS = {
    "step": "training step: images/s, FLOPs, MFU, compile time, memory",
    "augment": "on-device multi-crop augmentation cost",
    "pipeline": "host input pipeline throughput per CPU core",
    "predict": "predicted training time of a recipe on one accelerator (FLOPs / rate)",
    "profile": "group the device time of a `step --profile DIR` trace again (matmul, ...)",
    "report": "`step` JSON lines as markdown tables (for docs/performance.md)",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        lines = "\n".join(f"  {name:<9} {text}" for name, text in COMMANDS.items())
        print(f"usage: dino-jax-bench COMMAND [options]\n{lines}", file=sys.stderr)
        sys.exit(0 if sys.argv[1:2] in (["--help"], ["-h"]) else 2)
    module = importlib.import_module(f"dino_jax.bench.{sys.argv[1]}")
    module.main(sys.argv[2:])


if __name__ == "__main__":
    main()

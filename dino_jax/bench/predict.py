"""Predicted training time of a recipe on one accelerator, from its FLOPs and a rate.

dino-jax-bench predict [--config=vit_small16] [--mfu 0.34] [--peak_tflops 780] [--images N]

The FLOPs of one training step per source image are `bench step`'s (analytic for a ViT, XLA's
count of the lowered forward for a ResNet or XCiT: the student's forward and backward on every
crop, the teacher's forward on the global crops). The time is epochs x images x FLOPs over
`mfu` x `peak_tflops`. Defaults: the 34% MFU `bench step` measured for ViT-B/16 (batch 64, bf16)
on one H100, and the bf16 matmul rate measured on an H200 (770-800 TFLOP/s). A prediction,
not a measurement: measure a recipe with `bench step` on the card itself.

Exit status: 0 done, or --help; 2 a user error (command line, config), with a message.
"""

from __future__ import annotations

import json

from dino_jax import cli

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 train split (TFDS imagenet2012 "train")
DEFAULT_MFU = 0.34
DEFAULT_PEAK_TFLOPS = 780.0


def predict(config, *, mfu: float, peak_tflops: float, images: int) -> dict:
    from dino_jax.bench.flops import dino_flops_per_image

    flops = dino_flops_per_image(config)
    total = flops * images * config.optim.epochs
    seconds = total / (mfu * peak_tflops * 1e12)
    return {
        "arch": config.model.arch,
        "patch": config.model.patch_size,
        "crops": f"{config.aug.n_global}x{config.aug.global_size}"
        f" + {config.aug.n_local}x{config.aug.local_size}",
        "epochs": config.optim.epochs,
        "images_per_epoch": images,
        "gflop_per_image": flops / 1e9,
        "total_eflop": total / 1e18,
        "mfu": mfu,
        "peak_tflops": peak_tflops,
        "predicted_images_per_s": mfu * peak_tflops * 1e12 / flops,
        "predicted_hours_one_device": seconds / 3600,
    }


def build_parser():
    parser = cli.parser("dino-jax-bench predict", __doc__)
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="fraction of the peak")
    parser.add_argument("--peak_tflops", type=float, default=DEFAULT_PEAK_TFLOPS)
    parser.add_argument("--images", type=int, default=IMAGENET_TRAIN_IMAGES, help="per epoch")
    return parser


def argument_errors(args) -> list[str]:
    errors = []
    if not 0 < args.mfu <= 1:
        errors.append(f"--mfu {args.mfu}: a fraction in (0, 1]")
    if not args.peak_tflops > 0:
        errors.append(f"--peak_tflops {args.peak_tflops}: must be > 0")
    if args.images < 1:
        errors.append(f"--images {args.images}: at least 1 image per epoch")
    return errors


def main(argv: list[str] | None = None) -> dict:
    cmd = cli.parse_command(build_parser, argv, default_recipe="vit_small16")
    errors = argument_errors(cmd.args)
    if errors:
        cli.fail(cmd.prog, "invalid command line:\n  - " + "\n  - ".join(errors))
    from dino_jax.validation import model_errors

    errors = model_errors(cmd.config.model)
    if errors:
        cli.fail(cmd.prog, "invalid configuration:\n  - " + "\n  - ".join(errors))
    args = cmd.args
    result = predict(cmd.config, mfu=args.mfu, peak_tflops=args.peak_tflops, images=args.images)
    print(json.dumps(result))
    return result

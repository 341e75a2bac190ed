"""Evaluate a backbone: `dino-jax-evaluate {knn,linear,attention,video} --weights W [...]`.

W is a dino_jax work directory (its latest checkpoint) or an official `.pth`. The config is the
work directory's saved one (or `--config=NAME|FILE`, or the defaults for a .pth), with keys set
as in training: `--config.data.source=folder`, `--config.linear.epochs=10`. A work directory
is only read: it may be evaluated while it trains.

Exit status: 0 done, or --help; 1 an unexpected error (a traceback); 2 a user error (command
line, config, weights, data, an unusable --out or --features_dir), with a message, found before
any feature is computed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import numpy as np

from dino_jax import cli
from dino_jax.evaluate.cli_checks import argument_errors, size_errors, video_size

_LOG = logging.getLogger("dino_jax.evaluate")
PROG = "dino-jax-evaluate"


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(PROG, __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    knn = commands.add_parser("knn", help="weighted k-NN (eval_knn.py)", allow_abbrev=False)
    linear = commands.add_parser("linear", help="linear probe (eval_linear.py)", allow_abbrev=False)
    attention = commands.add_parser(
        "attention", help="attention maps of one image", allow_abbrev=False
    )
    video = commands.add_parser(
        "video",
        help="attention video of a video file or a folder of frames (video_generation.py)",
        allow_abbrev=False,
    )
    for sub in (knn, linear, attention, video):
        sub.add_argument(
            "--weights",
            required=True,
            help="work directory, official .pth, or a released model's name (dino_vits16, ...)",
        )
        sub.add_argument("--which", default="teacher", choices=("teacher", "student"))
        sub.add_argument("--num_heads", type=int, default=None, help="for non-official widths")
        sub.add_argument(
            "--dtype",
            default="float32",
            choices=("float32", "bfloat16", "config"),
            help="compute dtype (official evaluations: float32; 'config': the training one)",
        )
        sub.add_argument(
            "--checkpoint_info_logs", action="store_true", help="show Orbax's INFO messages"
        )
    for sub in (knn, linear):
        sub.add_argument("--out", default=None, help="directory for the results (JSON)")
    knn.add_argument("--features_dir", default=None, help="save / reuse the extracted features")
    knn.add_argument(
        "--baselines",
        action="store_true",
        help="also k-NN of the config's network at its random initialisation and of raw pixels",
    )
    attention.add_argument("--image", required=True, help="any RGB or greyscale photo")
    attention.add_argument(
        "--image_size",
        type=int,
        nargs="+",
        default=[480],
        help="one int: shorter side (aspect kept); two: height width (official: 480 480)",
    )
    attention.add_argument(
        "--threshold",
        type=float,
        default=0.6,
        help="attention mass the masks keep; a negative value writes no masks",
    )
    attention.add_argument("--out", required=True, help="output directory for the PNGs")
    video.add_argument(
        "--input", required=True, help="a video file, or a folder of frames (sorted by name)"
    )
    video.add_argument(
        "--out", required=True, help="a new or empty directory for the PNGs and videos"
    )
    video.add_argument(
        "--resize",
        nargs="+",
        default=["480"],
        help="frames' shorter side (aspect kept), or height width, or 'none' to keep their"
        " size (the official default: much memory for big frames)",
    )
    video.add_argument(
        "--threshold",
        type=float,
        default=0.6,
        help="attention mass the mask video keeps; a negative value makes none",
    )
    video.add_argument(
        "--fps", type=float, default=None, help="output frame rate (default: the video's, or 30)"
    )
    video.add_argument("--batch_size", type=int, default=8, help="frames per forward pass")
    return parser


# ----------------------------------------------------------------------------- commands


def _writer() -> bool:
    """Files and output come from process 0 only (every process computes)."""
    import jax

    return jax.process_index() == 0


def _cached_features(config, backbone, variables, mesh, features_dir, identity, split):
    """(features, labels) of `split`, read from `features_dir` when extracted there before."""
    from dino_jax.evaluate.features import split_features
    from dino_jax.evaluate.knn import load_features, save_features

    meta = {
        **identity,
        "split": split,
        "data": {k: config.data[k] for k in ("source", "tfds_name", "data_dir")},
        "eval": {"resize": config.eval.resize, "crop": config.eval.crop},
        "mean": list(config.aug.mean),
        "std": list(config.aug.std),
    }
    path = None
    if features_dir:
        os.makedirs(features_dir, exist_ok=True)
        path = os.path.join(features_dir, split.replace("/", "_") + ".npz")
        if os.path.exists(path):
            feats, labels, saved = load_features(path)
            stored = {k: saved.get(k) for k in meta}
            if stored != json.loads(json.dumps(meta)):
                cli.fail(
                    PROG,
                    f"{path} holds features of another model or setting ({stored}); use"
                    " another --features_dir or delete the file",
                )
            _LOG.info("features of %s read from %s", split, path)
            return feats, labels
    feats, labels = split_features(config, backbone, variables, mesh, split, show_progress=True)
    if path and _writer():
        save_features(path, feats, labels, meta)
    return feats, labels


def run_knn(args, config, backbone, variables, info, mesh) -> dict[str, Any]:
    """knn_eval.knn_evaluation with an optional feature cache, and optionally its baselines."""
    from dino_jax.evaluate.knn_eval import knn_evaluation

    identity = info.describe()
    sizes = {}

    def features(split):
        out = _cached_features(
            config, backbone, variables, mesh, args.features_dir, identity, split
        )
        sizes[split] = len(out[1])
        return out

    metrics = knn_evaluation(config, backbone, variables, mesh, features=features)
    if args.baselines:
        from dino_jax import recipe
        from dino_jax.evaluate.baselines import baseline_metrics

        start = time.perf_counter()
        metrics.update(baseline_metrics(config, recipe.build(config, 1), mesh))
        metrics["baselines/seconds"] = time.perf_counter() - start
    bank = sizes[config.data.eval_train_split]
    if config.eval.knn_max_train:
        bank = min(bank, config.eval.knn_max_train)
    queries = sizes[config.data.eval_test_split]
    return {**identity, "bank": bank, "queries": queries, "metrics": metrics}


def run_linear(args, config, backbone, variables, info, mesh) -> dict[str, Any]:
    from dino_jax.evaluate.linear import linear_evaluation
    from dino_jax.evaluate.probe import probe_summary

    result = linear_evaluation(config, backbone, variables, mesh)
    if args.out and _writer():
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, "linear_probe.npz"), **result.params)
    return {**info.describe(), "linear": config.linear.to_dict(), **probe_summary(result)}


def run_attention(args, backbone, variables, info) -> dict[str, Any]:
    from dino_jax.evaluate.attention import visualize

    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size[:2])
    threshold = None if args.threshold < 0 else args.threshold
    written = visualize(
        args.image,
        backbone,
        variables,
        args.out,
        mean=info.mean,
        std=info.std,
        image_size=size,
        threshold=threshold,
    )
    return {**info.describe(), "image": args.image, "written": written}


def run_video(args, backbone, variables, info) -> dict[str, Any]:
    from dino_jax.evaluate.video import import_av, make_video

    threshold = None if args.threshold < 0 else args.threshold
    try:
        result = make_video(
            args.input,
            backbone,
            variables,
            args.out,
            mean=info.mean,
            std=info.std,
            image_size=video_size(args.resize),
            threshold=threshold,
            fps=args.fps,
            batch_size=args.batch_size,
            show_progress=_writer(),
        )
    except import_av().FFmpegError as err:  # a damaged frame past the first, a full disk
        cli.fail(PROG, f"--input {args.input}: the video stopped ({err}); {args.out} is partial")
    return {**info.describe(), **result}


def check_eval_config(config, backbone, command: str, num_devices: int) -> None:
    """The sections an evaluation reads, checked by the training validators (the patch size
    is the loaded backbone's); exits 2 with every problem listed."""
    from dino_jax import validation as checks
    from dino_jax.models.backbones import size_multiple, vit_depth
    from dino_jax.validation_eval import eval_errors, linear_errors

    errors = checks.schema_errors(config)
    if not errors:
        errors += checks.data_errors(config.data, config.seed, config.init_from)
        errors += eval_errors(config.eval, size_multiple(backbone), num_devices)
        for key in ("eval_train_split", "eval_test_split"):
            if not config.data[key]:
                errors.append(f"data.{key} is empty: name the split (--config.data.{key}=...)")
        if command == "linear":
            errors += linear_errors(config.linear, vit_depth(backbone))
            if config.linear.batch_size % num_devices:
                errors.append(
                    f"linear.batch_size={config.linear.batch_size}: use a multiple of the"
                    f" {num_devices} devices"
                )
    if errors:
        cli.fail(PROG, "invalid configuration:\n  - " + "\n  - ".join(errors))


def evaluate(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one command; returns (and prints) its results as a JSON-friendly dict."""
    cmd = cli.parse_command(build_parser, argv)
    args = cmd.args
    if args.command in ("attention", "video") and (cmd.overrides or cmd.recipe):
        cli.fail(
            PROG,
            f"{args.command} takes no config (it reads the weights and the images only)",
        )
    errors = argument_errors(args)
    if errors:
        cli.fail(PROG, "invalid command line:\n  - " + "\n  - ".join(errors))
    cli.setup_logging(show_orbax_info=args.checkpoint_info_logs)
    from dino_jax.data.sources import DataError

    try:
        return _evaluate(cmd)
    except DataError as err:  # the data as configured cannot be read
        cli.fail(PROG, str(err))


def _evaluate(cmd: cli.Command) -> dict[str, Any]:
    from dino_jax import parallel
    from dino_jax.evaluate.weights import WeightsError, load_weights
    from dino_jax.interop.pth import UnsafeCheckpointError
    from dino_jax.models.backbones import has_attention_maps

    args = cmd.args

    dtype = None if args.dtype == "config" else args.dtype
    try:
        backbone, variables, info = load_weights(
            args.weights, which=args.which, num_heads=args.num_heads, dtype=dtype
        )
    except (WeightsError, UnsafeCheckpointError) as err:
        cli.fail(PROG, str(err))
    if args.command in ("attention", "video") and not has_attention_maps(backbone):
        cli.fail(
            PROG,
            f"attention maps need DINO's ViT: {args.weights} holds a"
            f" {type(backbone).__name__}, which returns no CLS self-attention to show",
        )
    if args.command == "attention":
        if min(args.image_size) < backbone.patch_size:
            cli.fail(PROG, f"--image_size: at least one {backbone.patch_size}-px patch")
        result = run_attention(args, backbone, variables, info)
    elif args.command == "video":
        size = video_size(args.resize)
        if size is not None and min(np.atleast_1d(size)) < backbone.patch_size:
            cli.fail(PROG, f"--resize: at least one {backbone.patch_size}-px patch")
        result = run_video(args, backbone, variables, info)
    else:
        config = cli.command_config(cmd, base=info.config)
        mesh = parallel.make_mesh()
        check_eval_config(config, backbone, args.command, mesh.size)
        errors = size_errors(config, args.command, getattr(args, "features_dir", None))
        if errors:
            cli.fail(PROG, "the configuration does not fit the data:\n  - " + "\n  - ".join(errors))
        if args.command == "knn":
            result = run_knn(args, config, backbone, variables, info, mesh)
        else:
            result = run_linear(args, config, backbone, variables, info, mesh)
        if args.out and _writer():
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{args.command}.json"), "w") as f:
                json.dump(result, f, indent=1)
    if _writer():
        print(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`dino-jax-evaluate`, `python -m dino_jax.evaluate`)."""
    evaluate(argv)

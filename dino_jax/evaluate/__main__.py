"""Evaluate a backbone: `python -m dino_jax.evaluate {knn,linear,attention} --weights W [...]`.

W is a dino_jax work directory (its latest checkpoint) or an official `.pth`; config keys are
overridden with `--section.key value` (`--data.source folder`, `--linear.epochs 10`).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import logging
import os
import sys
import time
from typing import Any

import ml_collections
import numpy as np

_LOG = logging.getLogger("dino_jax.evaluate")


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dino_jax.evaluate",
        description=__doc__.split("\n")[0],
        epilog="Any config key may follow as --section.key VALUE (see docs/evaluation.md).",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    knn = commands.add_parser("knn", help="weighted k-NN (eval_knn.py)", allow_abbrev=False)
    linear = commands.add_parser("linear", help="linear probe (eval_linear.py)", allow_abbrev=False)
    attention = commands.add_parser(
        "attention", help="attention maps of one image", allow_abbrev=False
    )
    for sub in (knn, linear, attention):
        sub.add_argument("--weights", required=True, help="work directory or official .pth")
        sub.add_argument("--which", default="teacher", choices=("teacher", "student"))
        sub.add_argument("--num_heads", type=int, default=None, help="for non-official widths")
        sub.add_argument(
            "--dtype",
            default="float32",
            choices=("float32", "bfloat16", "config"),
            help="compute dtype (official evaluations: float32; 'config': the training one)",
        )
    for sub in (knn, linear):
        sub.add_argument(
            "--config",
            default=None,
            help="config file (configs/*.py) for data and eval settings; default: the work"
            " directory's saved config, or dino_jax.config.default_config() for a .pth",
        )
        sub.add_argument("--out", default=None, help="directory for the results (JSON)")
    knn.add_argument("--features_dir", default=None, help="save / reuse the extracted features")
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
    return parser


def split_overrides(extra: list[str]) -> list[tuple[str, str]]:
    """`--a.b=v` / `--a.b v` pairs (a leading `config.` is dropped)."""
    pairs, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise SystemExit(f"unrecognised argument {arg!r} (config keys look like --data.source)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(extra):
            key, value = arg[2:], extra[i + 1]
            i += 2
        else:
            raise SystemExit(f"{arg} needs a value")
        pairs.append((key.removeprefix("config."), value))
    return pairs


def _parse_value(text: str, kind: type | None, current: Any) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{text!r} is not a bool")
        return text.lower() in ("true", "1")
    if kind in (int, float, str):
        return kind(text)
    if isinstance(current, (tuple, list)):
        value = ast.literal_eval(text if text.strip()[:1] in "([" else f"({text},)")
        return tuple(value)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(configs: dict[str, ml_collections.ConfigDict], pairs) -> None:
    """Set each dotted key; keys under `linear.` go to the linear-probe config."""
    from dino_jax.config import dotted

    for key, text in pairs:
        root, path = ("linear", key[len("linear.") :]) if key.startswith("linear.") else ("", key)
        try:
            node, leaf = dotted(configs[root], path)
            current, kind = node[leaf], node.get_type(leaf)
        except (KeyError, AttributeError):
            raise SystemExit(f"--{key}: no such config key") from None
        try:
            node[leaf] = _parse_value(text, kind, current)
        except (ValueError, TypeError, SyntaxError) as err:
            raise SystemExit(f"--{key}={text}: {err}") from None


def load_config_file(path: str) -> ml_collections.ConfigDict:
    from dino_jax.config import ConfigError, load_recipe

    try:
        return load_recipe(path)
    except ConfigError as err:
        raise SystemExit(f"--config: {err}") from None


# ----------------------------------------------------------------------------- commands


def _writer() -> bool:
    """Files and output come from process 0 only (every process computes)."""
    import jax

    return jax.process_index() == 0


def _cached_features(config, backbone, variables, mesh, split, features_dir, identity):
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
                raise SystemExit(
                    f"{path} holds features of another model or setting ({stored}); use"
                    " another --features_dir or delete the file"
                )
            _LOG.info("features of %s read from %s", split, path)
            return feats, labels
    feats, labels = split_features(config, backbone, variables, mesh, split, show_progress=True)
    if path and _writer():
        save_features(path, feats, labels, meta)
    return feats, labels


def run_knn(args, config, backbone, variables, info, mesh) -> dict[str, Any]:
    """The protocol of knn_eval.knn_evaluation, with optional feature caching."""
    from dino_jax.evaluate.knn_eval import knn_metrics

    start = time.perf_counter()
    identity = info.describe()
    train, test = (
        _cached_features(config, backbone, variables, mesh, split, args.features_dir, identity)
        for split in (config.data.eval_train_split, config.data.eval_test_split)
    )
    metrics = knn_metrics(config, train, test, mesh)
    metrics["knn/seconds"] = time.perf_counter() - start
    bank = (
        len(train[1])
        if not config.eval.knn_max_train
        else min(len(train[1]), config.eval.knn_max_train)
    )
    return {**identity, "bank": bank, "queries": len(test[1]), "metrics": metrics}


def run_linear(args, config, lin, backbone, variables, info, mesh) -> dict[str, Any]:
    from dino_jax.evaluate.linear import linear_evaluation
    from dino_jax.evaluate.probe import probe_summary, validate_linear

    try:
        validate_linear(lin, backbone.depth)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    result = linear_evaluation(config, lin, backbone, variables, mesh)
    if args.out and _writer():
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, "linear_probe.npz"), **result.params)
    return {**info.describe(), "linear": lin.to_dict(), **probe_summary(result)}


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


def eval_config(args, info) -> ml_collections.ConfigDict:
    from dino_jax.config import default_config

    if args.config:
        return load_config_file(args.config)
    if info.config is not None:
        return copy.deepcopy(info.config)
    return default_config()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one command; returns (and prints) its results as a JSON-friendly dict."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    pairs = split_overrides(extra)
    if args.command == "attention" and pairs:
        parser.error(f"attention takes no config keys (got --{pairs[0][0]})")
    if args.command == "attention" and not os.path.isfile(args.image):
        raise SystemExit(f"error: --image {args.image}: no such file")

    from dino_jax import parallel
    from dino_jax.evaluate.probe import linear_config
    from dino_jax.evaluate.weights import WeightsError, load_weights
    from dino_jax.interop.pth import UnsafeCheckpointError

    dtype = None if args.dtype == "config" else args.dtype
    try:
        backbone, variables, info = load_weights(
            args.weights, which=args.which, num_heads=args.num_heads, dtype=dtype
        )
    except (WeightsError, UnsafeCheckpointError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.command == "attention":
        result = run_attention(args, backbone, variables, info)
    else:
        config, lin = eval_config(args, info), linear_config()
        apply_overrides({"": config, "linear": lin}, pairs)
        for key in ("eval_train_split", "eval_test_split"):
            if not config.data[key]:
                raise SystemExit(f"error: data.{key} is empty: name the split (--data.{key} ...)")
        if config.eval.crop % backbone.patch_size:
            raise SystemExit(
                f"eval.crop={config.eval.crop} is not a multiple of the patch size"
                f" {backbone.patch_size}"
            )
        mesh = parallel.make_mesh()
        if args.command == "knn":
            result = run_knn(args, config, backbone, variables, info, mesh)
        else:
            result = run_linear(args, config, lin, backbone, variables, info, mesh)
        if args.out and _writer():
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{args.command}.json"), "w") as f:
                json.dump(result, f, indent=1)
    if _writer():
        print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    main()

"""The official DINO code and dino_jax side by side: same data, same recipe, same seeds.

    python scripts/compare_official.py --official PATH/TO/dino [--seeds 0 1] [--out DIR]

PATH/TO/dino is a checkout of https://github.com/facebookresearch/dino (never vendored here).
For each seed, it trains the official implementation (its own modules: see
scripts/official_side.py) and ours (train.py) with the recipe of --config (configs/demo.py)
on the same images, then evaluates both teachers with both k-NN evaluators: ours
(`dino-jax-evaluate knn`) and the official eval_knn.knn_classifier (our teacher exported with
dino_jax.interop.official). It prints, and writes to DIR/table.md and DIR/results.json, a table
of per-seed figures with means and spreads, and the deviations that running the official
code on this recipe forces.

Environment: the official side needs PyTorch and torchvision, which dino_jax's own
requirements do not include. Make a separate one:

    python -m venv .venv-compare
    .venv-compare/bin/pip install -r requirements.txt -r scripts/requirements-compare.txt

and run the script with its python. `--sides official` / `--sides ours` run one side;
finished runs in DIR are reused (delete a run's folder to redo it).

Exit status: 0 done; 2 a usable checkout, environment or recipe is missing (a message).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from argparse import Namespace
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join("configs", "demo.py")

# Config keys passed to main_dino.py's flags of the same meaning: key -> flag.
OFFICIAL_FLAGS = {
    "seed": "seed",
    "model.patch_size": "patch_size",
    "model.out_dim": "out_dim",
    "model.norm_last_layer": "norm_last_layer",
    "model.use_bn_in_head": "use_bn_in_head",
    "model.drop_path_rate": "drop_path_rate",
    "dino.momentum_teacher": "momentum_teacher",
    "dino.warmup_teacher_temp": "warmup_teacher_temp",
    "dino.teacher_temp": "teacher_temp",
    "dino.warmup_teacher_temp_epochs": "warmup_teacher_temp_epochs",
    "optim.optimizer": "optimizer",
    "optim.batch_size": "batch_size_per_gpu",  # one process: the global batch
    "optim.epochs": "epochs",
    "optim.lr": "lr",
    "optim.min_lr": "min_lr",
    "optim.warmup_epochs": "warmup_epochs",
    "optim.weight_decay": "weight_decay",
    "optim.weight_decay_end": "weight_decay_end",
    "optim.clip_grad": "clip_grad",
    "optim.freeze_last_layer": "freeze_last_layer",
    "aug.global_scale": "global_crops_scale",
    "aug.local_scale": "local_crops_scale",
    "aug.n_local": "local_crops_number",
}
# Keys main_dino.py has no flag for, which this script sets on the official objects (the
# network's sizes, the crops' sizes and statistics, the evaluation's sizes): key -> name.
SET_BY_SCRIPT = {
    "model.embed_dim": "embed_dim",
    "model.depth": "depth",
    "model.num_heads": "num_heads",
    "model.head_nlayers": "head_nlayers",
    "model.head_hidden_dim": "head_hidden_dim",
    "model.head_bottleneck_dim": "head_bottleneck_dim",
    "aug.global_size": "global_size",
    "aug.local_size": "local_size",
    "aug.mean": "mean",
    "aug.std": "std",
    "eval.resize": "eval_resize",
    "eval.crop": "eval_crop",
    "eval.knn_temperature": "knn_temperature",
}
# Keys whose value the official code fixes: the recipe must have exactly this value.
OFFICIAL_CONSTANTS = {
    "model.arch": "custom",  # vision_transformer.VisionTransformer with the sizes above
    "model.compute_dtype": "float32",  # --use_fp16 false: the official fp32 run
    "model.param_dtype": "float32",
    "model.ffn": "mlp",
    "model.gelu": "exact",
    "model.num_register_tokens": 0,
    "model.layerscale_init": 0.0,
    "model.interpolate_offset": 0.1,
    "model.interpolate_antialias": False,
    "model.remat": "none",
    "dino.student_temp": 0.1,
    "dino.center_momentum": 0.9,
    "dino.centering": "ema",
    "dino.koleo_weight": 0.0,
    "dino.ibot_weight": 0.0,
    "dino.gram_weight": 0.0,
    "aug.n_global": 2,
    "aug.ratio": (3.0 / 4.0, 4.0 / 3.0),
    "aug.flip_prob": 0.5,
    "aug.jitter_prob": 0.8,
    "aug.brightness": 0.4,
    "aug.contrast": 0.4,
    "aug.saturation": 0.2,
    "aug.hue": 0.1,
    "aug.grayscale_prob": 0.2,
    "aug.global_blur_prob": (1.0, 0.1),
    "aug.global_solarize_prob": (0.0, 0.2),
    "aug.local_blur_prob": 0.5,
    "aug.blur_radius": (0.1, 2.0),
}
# Keys that do not change what is computed (speed, layout, logging), or belong to options the
# constants above switch off.
NOT_RECIPE_PREFIXES = (
    "model.attention",  # attention, attention_pad: the same attention, other kernels
    "model.rope_",
    "model.resnet_",
    "dino.koleo_chunks",
    "dino.ibot_",
    "dino.gram_",
    "aug.window",  # the same crops, resampled from a smaller window
    "optim.branch_updates",  # the same update, another program
    "optim.wait_for_gradient",  # the same update, another program
    "dino.loss_chunks",  # the same loss, its logits made in chunks
    "optim.flat_state",  # the same update, the state in flat groups while stepping
)
SECTIONS = ("model", "dino", "optim", "aug")
# The k-NN figure compared: k = 20, the headline of eval_knn.py and of dino_jax's evaluation.
KNN_K = 20

# What running the official code on this recipe changes from `python main_dino.py`.
OFFICIAL_DEVIATIONS = (
    "one CPU process: a one-process gloo group stands in for the GPU's NCCL one (DDP, the"
    " DistributedSampler and DINOLoss's all_reduce run unchanged); `.cuda()` and"
    " `torch.cuda.synchronize()` are no-ops; MetricLogger's cross-process sum is skipped"
    " (the identity for one process)",
    "float32 throughout (--use_fp16 false), as dino_jax's compute_dtype float32",
    "the network is vision_transformer.VisionTransformer built as vit_tiny builds it, with"
    " the recipe's width, depth and heads, and img_size = the global crop side (the stored"
    " position grid is the global crops' grid, as in dino_jax); DINOHead gets the recipe's"
    " hidden and bottleneck widths",
    "DataAugmentationDINO as main_dino.py builds it, with its RandomResizedCrop sizes set to"
    " the recipe's crop sides and its Normalize to the recipe's mean and std",
    "the images come from memory, grey images converted to RGB with PIL as ImageFolder's"
    " loader converts files; one loader worker (main_dino.py's default is 10)",
)


def get_path(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def recipe_keys(config: Any) -> list[str]:
    """Every key of the sections that define the method, plus the seed."""
    from dino_jax.config import leaves

    keys = ["seed"]
    for section in SECTIONS:
        keys += [f"{section}.{k}" for k in leaves(config[section])]
    return keys


def recipe_problems(config: Any) -> list[str]:
    """Why the official code cannot run this recipe as dino_jax does (empty: it can)."""
    problems = []
    mapped = set(OFFICIAL_FLAGS) | set(SET_BY_SCRIPT) | set(OFFICIAL_CONSTANTS)
    for key in recipe_keys(config):
        if key in mapped or key.startswith(NOT_RECIPE_PREFIXES):
            continue
        problems.append(f"{key} has no counterpart in the comparison: map it in this script")
    for key, official in OFFICIAL_CONSTANTS.items():
        value = get_path(config, key)
        if _normal(value) != _normal(official):
            problems.append(f"{key}={value!r}: the official code fixes it at {official!r}")
    if config.model.out_dim < 1:
        problems.append("model.out_dim must be positive")
    return problems


def _normal(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(round(float(v), 9) for v in value)
    if isinstance(value, float):
        return round(value, 9)
    return value


def official_args(config: Any, seed: int) -> Namespace:
    """main_dino.py's arguments for the recipe `config` (after recipe_problems is empty)."""
    values = {flag: get_path(config, key) for key, flag in OFFICIAL_FLAGS.items()}
    values.update({name: get_path(config, key) for key, name in SET_BY_SCRIPT.items()})
    values["seed"] = seed
    for name in ("global_crops_scale", "local_crops_scale", "mean", "std"):
        values[name] = tuple(float(v) for v in values[name])
    values.update(use_fp16=False, arch="vit_custom", num_workers=1, threads=2)
    return Namespace(**values)


# ----------------------------------------------------------------------------- the runs


def load_recipe(path: str) -> Any:
    from dino_jax.config import load_recipe as load

    return load(path)


def demo_splits(config: Any):
    from dino_jax.data.sources.demo import load_split

    return (
        load_split(config.data.split, config.data.data_dir),
        load_split(config.data.eval_train_split, config.data.data_dir),
        load_split(config.data.eval_test_split, config.data.data_dir),
    )


def run_official(off, config, seed: int, out: str, log) -> dict[str, Any]:
    from scripts import official_side

    run_dir = os.path.join(out, f"official_seed{seed}")
    done = os.path.join(run_dir, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    args = official_args(config, seed)
    train_split = demo_splits(config)[0]
    start = time.perf_counter()
    history = official_side.train(off, args, *train_split, run_dir, log=log)
    seconds = time.perf_counter() - start
    record = {"losses": [h["train_loss"] for h in history], "train_seconds": seconds}
    with open(done, "w") as f:
        json.dump(record, f)
    return record


def run_ours(
    config_path: str, seed: int, out: str, python: str, log, overrides: list[str], config: Any
) -> dict[str, Any]:
    run_dir = os.path.join(out, f"ours_seed{seed}")
    done = os.path.join(run_dir, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    command = [
        python,
        os.path.join(ROOT, "train.py"),
        f"--config={config_path}",
        f"--workdir={os.path.join(run_dir, 'workdir')}",
        f"--config.seed={seed}",
        "--config.train.log_every_steps=1",  # every step's loss, for the epochs' means
        "--config.eval.report_baselines=False",
        *overrides,
    ]
    log(f"ours seed {seed}: {' '.join(command)}")
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    losses = epoch_losses(os.path.join(run_dir, "workdir"), config)
    record = {"losses": losses, "train_seconds": seconds}
    with open(done, "w") as f:
        json.dump(record, f)
    return record


def epoch_losses(workdir: str, config: Any) -> list[float]:
    """Mean training loss of each epoch from train.jsonl (every step logged): what
    main_dino's log.txt holds as train_loss (MetricLogger's global average)."""
    from dino_jax.data.sources.demo import load_split

    n_images = len(load_split(config.data.split, config.data.data_dir)[0])
    steps_per_epoch = n_images // config.optim.batch_size
    per_step = {}
    with open(os.path.join(workdir, "train.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "train/loss" in record:
                per_step[int(record["step"])] = float(record["train/loss"])
    epochs = []
    for e in range(config.optim.epochs):
        steps = [
            per_step[s]
            for s in range(e * steps_per_epoch + 1, (e + 1) * steps_per_epoch + 1)
            if s in per_step
        ]
        epochs.append(sum(steps) / len(steps) if steps else float("nan"))
    return epochs


# ----------------------------------------------------------------------------- evaluation


def our_knn(weights: str, config_path: str, config: Any, python: str, out: str) -> float:
    """`dino-jax-evaluate knn` (our evaluator) on a work directory or an official .pth."""
    command = [
        python,
        "-m",
        "dino_jax.evaluate",
        "knn",
        f"--weights={weights}",
        f"--config={config_path}",
        f"--num_heads={config.model.num_heads}",
        f"--out={out}",
    ]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "knn.json")) as f:
        result = json.load(f)
    return float(result["metrics"][f"knn/top1_k{KNN_K}"])


def official_knn(off, config: Any, state: dict[str, Any]) -> float:
    """eval_knn.knn_classifier on the official ViT holding `state` (a backbone state dict)."""
    from scripts import official_side

    _, bank, queries = demo_splits(config)
    args = official_args(config, 0)
    return official_side.knn(off, args, state, bank, queries, KNN_K, args.knn_temperature)


def our_teacher_state(workdir: str) -> dict[str, Any]:
    """Our trained teacher backbone as an official state dict, through our exporter."""
    import numpy as np
    import torch

    from dino_jax.evaluate.weights import load_weights
    from dino_jax.interop.official import official_state_dict

    _, variables, _ = load_weights(workdir, which="teacher")
    state = official_state_dict({"backbone": variables["params"]})
    return {k.removeprefix("backbone."): torch.from_numpy(np.array(v)) for k, v in state.items()}


def evaluate_pair(off, config, config_path, seed, out, python, log) -> dict[str, float]:
    """Both teachers of one seed through both evaluators."""
    from scripts import official_side

    path = os.path.join(out, f"evaluation_seed{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    official_ckpt = os.path.join(out, f"official_seed{seed}", "checkpoint.pth")
    our_workdir = os.path.join(out, f"ours_seed{seed}", "workdir")
    result = {
        "official_teacher/official_knn": official_knn(
            off, config, official_side.teacher_backbone_state(official_ckpt)
        ),
        "ours_teacher/official_knn": official_knn(off, config, our_teacher_state(our_workdir)),
        "official_teacher/our_knn": our_knn(
            official_ckpt, config_path, config, python, os.path.join(out, f"knn_official{seed}")
        ),
        "ours_teacher/our_knn": our_knn(
            our_workdir, config_path, config, python, os.path.join(out, f"knn_ours{seed}")
        ),
    }
    log(f"seed {seed}: {result}")
    with open(path, "w") as f:
        json.dump(result, f)
    return result


# ----------------------------------------------------------------------------- the table


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def table(results: dict[str, Any], seeds: list[int]) -> str:
    """Markdown: one row per figure, one column per seed, then mean +- spread."""
    rows = [
        ("last-epoch training loss", "loss", "official"),
        ("last-epoch training loss", "loss", "ours"),
        ("k-NN top-1 (official eval_knn)", "official_knn", "official"),
        ("k-NN top-1 (official eval_knn)", "official_knn", "ours"),
        ("k-NN top-1 (dino-jax-evaluate)", "our_knn", "official"),
        ("k-NN top-1 (dino-jax-evaluate)", "our_knn", "ours"),
        ("training time (s)", "seconds", "official"),
        ("training time (s)", "seconds", "ours"),
    ]
    head = "| figure | trained by | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |"
    lines = [head, "|" + "---|" * (len(seeds) + 3)]
    for label, what, side in rows:
        values = [figure(results, side, s, what) for s in seeds]
        m, sd = mean_spread(values)
        digits = 0 if what == "seconds" else (3 if what == "loss" else 2)
        cells = " | ".join(f"{v:.{digits}f}" for v in values)
        lines.append(f"| {label} | {side} | {cells} | {m:.{digits}f} ± {sd:.{digits}f} |")
    return "\n".join(lines)


def figure(results: dict[str, Any], side: str, seed: int, what: str) -> float:
    run = results[side][str(seed)]
    if what == "loss":
        return run["losses"][-1]
    if what == "seconds":
        return run["train_seconds"]
    return results["evaluation"][str(seed)][f"{side}_teacher/{what}"]


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="compare_official.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--official", required=True, help="checkout of facebookresearch/dino")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="recipe file (configs/demo.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default=os.path.join("workdirs", "compare_official"))
    p.add_argument("--sides", default="official,ours", help="official,ours | official | ours")
    p.add_argument("--python", default=sys.executable, help="python that runs dino_jax")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"compare_official.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    args = parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    checkout = os.path.abspath(args.official)
    if not os.path.isfile(os.path.join(checkout, "main_dino.py")):
        fail(f"--official {checkout} has no main_dino.py: clone facebookresearch/dino there")
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as err:  # a missing wheel, or one built for another torch
        fail(
            f"the official side needs PyTorch and torchvision ({type(err).__name__}: {err});"
            " make the environment this script's docstring names and run it with its python"
        )
    sides = [s for s in args.sides.split(",") if s]
    if not set(sides) <= {"official", "ours"} or not sides:
        fail(f"--sides {args.sides}: official,ours | official | ours")
    config = load_recipe(os.path.join(ROOT, args.config))
    overrides = []
    if args.epochs is not None:
        config.optim.epochs = args.epochs
        overrides.append(f"--config.optim.epochs={args.epochs}")
    if problems := recipe_problems(config):
        fail("the recipe cannot run on the official code as it is:\n  - " + "\n  - ".join(problems))

    from scripts import official_side

    def log(text: str) -> None:
        print(text, flush=True)

    os.makedirs(args.out, exist_ok=True)
    off = official_side.import_checkout(checkout)
    results: dict[str, Any] = {"official": {}, "ours": {}, "evaluation": {}}
    for seed in args.seeds:
        if "official" in sides:
            results["official"][str(seed)] = run_official(off, config, seed, args.out, log)
        if "ours" in sides:
            results["ours"][str(seed)] = run_ours(
                args.config, seed, args.out, args.python, log, overrides, config
            )
    if set(sides) == {"official", "ours"}:
        for seed in args.seeds:
            results["evaluation"][str(seed)] = evaluate_pair(
                off, config, args.config, seed, args.out, args.python, log
            )
        text = table(results, args.seeds)
        results.update(
            official_commit=off.commit, config=args.config, deviations=list(OFFICIAL_DEVIATIONS)
        )
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        print(f"official code: facebookresearch/dino at {off.commit}")
        print("deviations forced by running the official code here:")
        for d in OFFICIAL_DEVIATIONS:
            print(f"  - {d}")


if __name__ == "__main__":
    main()

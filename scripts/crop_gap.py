"""One network, two augmentation pipelines: the DINO loss and crop statistics on the same images.

    python scripts/crop_gap.py --official PATH/TO/dino --weights W [--images 1024] [--rounds 4]

W is a main_dino.py checkpoint.pth (student, teacher, center) or a dino_jax work directory
(exported to that layout with dino_jax.interop.official). The same images (the recipe's
training split) are cropped by main_dino.DataAugmentationDINO (PIL / torchvision, as
scripts/official_side.py sets it up) and by dino_jax.data.augment.multicrop; both sets go
through the same student and teacher, and the official DINOLoss (the checkpoint's center, the
last epoch's teacher temperature, the center left as it is) gives one loss per batch. It prints
the mean loss of each pipeline with its standard error, and per kind of crop (first global,
second global, local) the mean, contrast (standard deviation) and high-frequency energy of the
crops with the Kolmogorov-Smirnov distance between the pipelines' distributions.
`--without jitter|blur|solarize|flip|grayscale` switches that op off in both pipelines.

Run it with the environment scripts/compare_official.py names (PyTorch, torchvision, and
dino_jax's requirements).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("global1", "global2", "local")
OPS = ("jitter", "blur", "solarize", "flip", "grayscale")


def switch_off_ours(mc, op: str | None):
    import dataclasses

    if op is None:
        return mc
    zero_global = tuple(0.0 for _ in mc.global_blur_prob)
    changes = {
        "jitter": {"jitter_prob": 0.0},
        "blur": {"global_blur_prob": zero_global, "local_blur_prob": 0.0},
        "solarize": {"global_solarize_prob": zero_global},
        "flip": {"flip_prob": 0.0},
        "grayscale": {"grayscale_prob": 0.0},
    }[op]
    return dataclasses.replace(mc, **changes)


def switch_off_official(aug, op: str | None, off):
    from torchvision import transforms

    from scripts.official_side import every_transform

    if op is None:
        return aug
    switched = {  # the op's transform type, and the attribute that gates it
        "jitter": (transforms.RandomApply, "p"),  # the RandomApply around ColorJitter
        "blur": (off.utils.GaussianBlur, "prob"),
        "solarize": (off.utils.Solarization, "p"),
        "flip": (transforms.RandomHorizontalFlip, "p"),
        "grayscale": (transforms.RandomGrayscale, "p"),
    }
    kind, gate = switched[op]
    for name in ("global_transfo1", "global_transfo2", "local_transfo"):
        for t in every_transform(getattr(aug, name)):
            if isinstance(t, kind):
                # GaussianBlur applies when random() <= prob: -1 never does; the others never
                # apply at 0
                setattr(t, gate, -1.0 if op == "blur" else 0.0)
    return aug


def official_crops(aug, images: np.ndarray) -> list[np.ndarray]:
    """Per crop position, (B, 3, H, W) normalised float32 crops of uint8 grey images."""
    from PIL import Image

    per_image = [aug(Image.fromarray(im).convert("RGB")) for im in images]
    return [np.stack([c[i].numpy() for c in per_image]) for i in range(len(per_image[0]))]


def our_crops(fn, images: np.ndarray, seed: int) -> list[np.ndarray]:
    import jax

    keys = jax.random.split(jax.random.key(seed), len(images))
    g, loc = fn(keys, np.repeat(images[..., None], 3, -1))
    g, loc = np.asarray(g), np.asarray(loc)
    views = [g[:, i] for i in range(g.shape[1])] + [loc[:, i] for i in range(loc.shape[1])]
    return [v.transpose(0, 3, 1, 2) for v in views]


def build_networks(off, args, state: dict):
    """Student and teacher MultiCropWrappers holding a main_dino checkpoint's weights."""
    from scripts import official_side

    nets = {}
    for which in ("student", "teacher"):
        net = off.utils.MultiCropWrapper(
            official_side.build_backbone(off, args),
            official_side.build_head(off, args, args.norm_last_layer or which == "teacher"),
        )
        weights = {k.removeprefix("module."): v for k, v in state[which].items()}
        net.load_state_dict(weights, strict=True)
        nets[which] = net.eval()
    return nets


def batch_loss(off, args, nets, loss_fn, views: list[np.ndarray]) -> float:
    import torch

    with torch.no_grad():
        tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in views]
        teacher = nets["teacher"](tensors[:2])
        student = nets["student"](tensors)
        fn = copy.deepcopy(loss_fn)  # the forward moves the center: keep the checkpoint's
        return float(fn(student, teacher, args.epochs - 1))


def to_uint8_scale(views: list[np.ndarray], mean, std) -> list[np.ndarray]:
    m, s = np.asarray(mean)[:, None, None], np.asarray(std)[:, None, None]
    return [(v * s + m).transpose(0, 2, 3, 1) * 255.0 for v in views]


def load_checkpoint(weights: str, config) -> dict:
    import torch

    if os.path.isdir(weights):
        return export_workdir(weights, config)
    return torch.load(weights, map_location="cpu", weights_only=False)


def export_workdir(workdir: str, config) -> dict:
    """A dino_jax work directory's latest student, teacher and center, as main_dino saves."""
    import jax
    import orbax.checkpoint as ocp
    import torch

    from dino_jax.evaluate.weights import _checkpoint_dir
    from dino_jax.interop.official import official_state_dict

    directory = _checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_names=("state",),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    )
    step = manager.latest_step()
    tree = manager.item_metadata(step)["state"].tree
    target = {k: tree[k] for k in ("student", "teacher", "center")}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    state = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            )
        ),
    ).state
    manager.close()

    def as_torch(d):
        return {k: torch.from_numpy(np.array(v)) for k, v in d.items()}

    return {
        "student": as_torch(official_state_dict(state["student"], "module.")),
        "teacher": as_torch(official_state_dict(state["teacher"])),
        "center": torch.from_numpy(np.array(state["center"], np.float32).reshape(1, -1)),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="crop_gap.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--official", required=True, help="checkout of facebookresearch/dino")
    p.add_argument("--weights", required=True, help="main_dino checkpoint.pth or work directory")
    p.add_argument("--config", default=os.path.join("configs", "demo.py"))
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=4, help="crops drawn per image and pipeline")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--without", choices=OPS, default=None)
    p.add_argument("--seed", type=int, default=0)
    args_cli = p.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)

    import jax
    import torch

    from dino_jax.data import augment
    from dino_jax.data.crop_statistics import crop_statistics, ks_bound, ks_distance
    from scripts import compare_official as co
    from scripts import official_side

    config = co.load_recipe(os.path.join(ROOT, args_cli.config))
    off = official_side.import_checkout(args_cli.official)
    official_side.init_process_group()
    args = co.official_args(config, args_cli.seed)
    state = load_checkpoint(args_cli.weights, config)
    nets = build_networks(off, args, state)
    loss_fn = official_side.make_dino_loss(off, args)
    center = state["center"] if "center" in state else state["dino_loss"]["center"]
    loss_fn.center = torch.as_tensor(np.asarray(center, np.float32)).reshape(1, -1)

    torch.manual_seed(args_cli.seed)
    import random

    random.seed(args_cli.seed)
    aug = switch_off_official(official_side.dino_augmentation(off, args), args_cli.without, off)
    mc = switch_off_ours(augment.MultiCropConfig.from_config(config.aug), args_cli.without)
    fn = jax.jit(lambda k, x: augment.multicrop(k, x, np.full((len(x), 2), x.shape[1]), mc))

    images = co.demo_splits(config)[0][0][: args_cli.images]
    losses = {"official": [], "ours": []}
    stats = {side: {kind: [] for kind in KINDS} for side in losses}
    for r in range(args_cli.rounds):
        for start in range(0, len(images), args_cli.batch):
            batch = images[start : start + args_cli.batch]
            seed = (args_cli.seed * 1_000_003 + r) * 100_003 + start
            for side, views in (
                ("official", official_crops(aug, batch)),
                ("ours", our_crops(fn, batch, seed)),
            ):
                losses[side].append(batch_loss(off, args, nets, loss_fn, views))
                pixels = to_uint8_scale(views, args.mean, args.std)
                stats[side]["global1"].append(pixels[0])
                stats[side]["global2"].append(pixels[1])
                stats[side]["local"].extend(pixels[2:])

    print(
        f"weights {args_cli.weights}, {len(images)} images x {args_cli.rounds} rounds"
        + (f", without {args_cli.without}" if args_cli.without else "")
    )
    for side, values in losses.items():
        v = np.asarray(values)
        sem = v.std(ddof=1) / math.sqrt(len(v))
        print(f"  DINO loss on {side:8s} crops: {v.mean():.4f} +- {sem:.4f}")
    gap = np.mean(losses["official"]) - np.mean(losses["ours"])
    print(f"  official - ours: {gap:+.4f}")
    for kind in KINDS:
        a = crop_statistics(np.concatenate(stats["official"][kind]))
        b = crop_statistics(np.concatenate(stats["ours"][kind]))
        for name in a:
            n, m = len(a[name]), len(b[name])
            d = ks_distance(a[name], b[name])
            print(
                f"  {kind:8s} {name:9s} official {a[name].mean():9.3f}  ours {b[name].mean():9.3f}"
                f"  KS {d:.4f} (same-distribution bound {ks_bound(n, m):.4f})"
            )


if __name__ == "__main__":
    main()

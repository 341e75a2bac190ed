"""The official DINO code's side of scripts/compare_official.py: training and k-NN with the
checkout's own modules, on one CPU process.

Imported only by compare_official.py, in the environment that has PyTorch and torchvision.
Everything DINO-specific comes from the checkout (facebookresearch/dino): the ViT
(vision_transformer.VisionTransformer), DINOHead, utils.MultiCropWrapper, DINOLoss, the
optimiser's parameter groups (utils.get_params_groups), the schedules (utils.cosine_scheduler),
the seeds (utils.fix_random_seeds), DataAugmentationDINO's transforms and the epoch itself
(main_dino.train_one_epoch, which does the clipping, the last-layer freeze and the EMA), the
checkpoint layout main_dino.train_dino saves, and eval_knn.knn_classifier. What running it
without a GPU needs is done here, and listed in OFFICIAL_DEVIATIONS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
import time
from argparse import Namespace
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Official:
    """The checkout's modules, imported once its directory is on sys.path."""

    main_dino: Any
    utils: Any
    vits: Any
    eval_knn: Any
    commit: str


def import_checkout(path: str) -> Official:
    """Import main_dino, utils, vision_transformer and eval_knn from an official checkout."""
    path = os.path.abspath(path)
    if path not in sys.path:
        sys.path.insert(0, path)
    import eval_knn
    import main_dino
    import utils
    import vision_transformer

    _run_on_cpu(utils)
    return Official(main_dino, utils, vision_transformer, eval_knn, _commit(path))


def _commit(path: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return done.stdout.strip()


def _run_on_cpu(utils: Any) -> None:
    """What the official loop needs to run on the CPU, unchanged otherwise.

    train_one_epoch moves each batch with `.cuda()` and waits with `torch.cuda.synchronize()`;
    on the CPU both have nothing to do. SmoothedValue.synchronize_between_processes builds a
    CUDA tensor to all-reduce its count and total; with one process the reduction is the
    identity, so it is skipped.
    """
    import torch

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    utils.SmoothedValue.synchronize_between_processes = lambda self: None


def init_process_group() -> None:
    """A one-process gloo group: DistributedDataParallel, DistributedSampler and DINOLoss's
    all_reduce of the center run as in a one-GPU official run."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


class ArrayImages:
    """(uint8 (N, H, W) grey images, labels) as an ImageFolder would give them: PIL RGB
    images (ImageFolder's loader converts every file to RGB) through `transform`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        image = Image.fromarray(self.images[i]).convert("RGB")
        return self.transform(image), int(self.labels[i])


def dino_augmentation(off: Official, args: Namespace):
    """main_dino.DataAugmentationDINO, its crop sizes and normalisation set to the recipe's.

    The class hard-codes 224 / 96 px crops and ImageNet statistics; every other op is left
    exactly as the class builds it."""
    from torchvision import transforms

    aug = off.main_dino.DataAugmentationDINO(
        args.global_crops_scale, args.local_crops_scale, args.local_crops_number
    )
    sizes = {
        "global_transfo1": args.global_size,
        "global_transfo2": args.global_size,
        "local_transfo": args.local_size,
    }
    for name, size in sizes.items():
        for t in every_transform(getattr(aug, name)):
            if isinstance(t, transforms.RandomResizedCrop):
                t.size = (size, size)
            if isinstance(t, transforms.Normalize):
                t.mean, t.std = list(args.mean), list(args.std)
    return aug


def every_transform(t):
    """`t` and every transform inside it (Compose and RandomApply hold others), depth first."""
    from torchvision import transforms

    yield t
    if isinstance(t, transforms.Compose | transforms.RandomApply):
        for child in t.transforms:
            yield from every_transform(child)


def build_backbone(off: Official, args: Namespace, drop_path_rate: float = 0.0):
    """vision_transformer.VisionTransformer with the recipe's sizes, built as the checkout's
    vit_tiny/vit_small do (mlp_ratio 4, qkv bias, LayerNorm eps 1e-6); img_size = the global
    crop, so the stored position grid is the global crops' grid, as in dino_jax."""
    import torch.nn as nn

    return off.vits.VisionTransformer(
        img_size=[args.global_size],
        patch_size=args.patch_size,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.num_heads,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=drop_path_rate,
    )


def build_head(off: Official, args: Namespace, norm_last_layer: bool):
    return off.vits.DINOHead(
        args.embed_dim,
        args.out_dim,
        use_bn=args.use_bn_in_head,
        norm_last_layer=norm_last_layer,
        nlayers=args.head_nlayers,
        hidden_dim=args.head_hidden_dim,
        bottleneck_dim=args.head_bottleneck_dim,
    )


@dataclasses.dataclass
class OfficialRun:
    """What main_dino.train_dino builds before its first epoch."""

    data_loader: Any
    student: Any  # DistributedDataParallel(MultiCropWrapper)
    teacher: Any
    teacher_without_ddp: Any
    dino_loss: Any
    optimizer: Any
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    momentum_schedule: np.ndarray


def set_up(off: Official, args: Namespace, images: np.ndarray, labels: np.ndarray) -> OfficialRun:
    """main_dino.train_dino's set-up, step for step (seeds, data, networks, loss, optimiser,
    schedules), on the CPU."""
    import torch
    import torch.nn as nn

    utils = off.utils
    init_process_group()
    torch.set_num_threads(args.threads)
    utils.fix_random_seeds(args.seed)

    dataset = ArrayImages(images, labels, dino_augmentation(off, args))
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True)
    data_loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=False,
        drop_last=True,
    )

    student = build_backbone(off, args, args.drop_path_rate)
    teacher = build_backbone(off, args)
    student = utils.MultiCropWrapper(student, build_head(off, args, args.norm_last_layer))
    teacher = utils.MultiCropWrapper(teacher, build_head(off, args, True))
    teacher_without_ddp = teacher
    student = nn.parallel.DistributedDataParallel(student)
    teacher_without_ddp.load_state_dict(student.module.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False

    dino_loss = make_dino_loss(off, args)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    n = len(data_loader)
    lr_schedule = utils.cosine_scheduler(
        args.lr * (args.batch_size_per_gpu * utils.get_world_size()) / 256.0,
        args.min_lr,
        args.epochs,
        n,
        warmup_epochs=args.warmup_epochs,
    )
    wd_schedule = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, n)
    momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, n)
    return OfficialRun(
        data_loader,
        student,
        teacher,
        teacher_without_ddp,
        dino_loss,
        optimizer,
        lr_schedule,
        wd_schedule,
        momentum_schedule,
    )


def make_dino_loss(off: Official, args: Namespace):
    """main_dino.DINOLoss as train_dino builds it."""
    return off.main_dino.DINOLoss(
        args.out_dim,
        args.local_crops_number + 2,
        args.warmup_teacher_temp,
        args.teacher_temp,
        args.warmup_teacher_temp_epochs,
        args.epochs,
    )


def train_epoch(off: Official, args: Namespace, run: OfficialRun, epoch: int, loader=None):
    """main_dino.train_one_epoch on `run` (or on `loader`, an iterable standing in for its
    data loader), its per-iteration printing dropped; returns its stats."""
    with contextlib.redirect_stdout(_Quiet(sys.stdout)):
        return off.main_dino.train_one_epoch(
            run.student,
            run.teacher,
            run.teacher_without_ddp,
            run.dino_loss,
            run.data_loader if loader is None else loader,
            run.optimizer,
            run.lr_schedule,
            run.wd_schedule,
            run.momentum_schedule,
            epoch,
            None,
            args,
        )


def train(
    off: Official,
    args: Namespace,
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str,
    log=print,
) -> list[dict[str, float]]:
    """main_dino.train_dino: set_up, then train_one_epoch per epoch.

    Writes `log.txt` (one JSON line per epoch, as main_dino does), `step_losses.json` and
    `checkpoint.pth` (main_dino's layout) into `out_dir`; returns the per-epoch stats."""
    import torch

    run = set_up(off, args, images, labels)
    data_loader, dino_loss = run.data_loader, run.dino_loss
    os.makedirs(out_dir, exist_ok=True)
    history = []
    # Every step's loss, as DINOLoss returns it (a forward hook: the module is unchanged).
    step_losses = []
    dino_loss.register_forward_hook(lambda module, inputs, loss: step_losses.append(loss.item()))
    start = time.perf_counter()
    for epoch in range(getattr(args, "stop_after_epochs", None) or args.epochs):
        data_loader.sampler.set_epoch(epoch)
        stats = train_epoch(off, args, run, epoch)
        stats = {f"train_{k}": float(v) for k, v in stats.items()}
        stats.update(epoch=epoch, seconds=time.perf_counter() - start)
        history.append(stats)
        log(f"official seed {args.seed} epoch {epoch}: loss {stats['train_loss']:.4f}")
        with open(os.path.join(out_dir, "log.txt"), "a") as f:
            f.write(json.dumps(stats) + "\n")
        with open(os.path.join(out_dir, "step_losses.json"), "w") as f:
            json.dump(step_losses, f)
    torch.save(
        {
            "student": run.student.state_dict(),
            "teacher": run.teacher.state_dict(),
            "epoch": args.epochs,
            "args": args,
            "dino_loss": dino_loss.state_dict(),
        },
        os.path.join(out_dir, "checkpoint.pth"),
    )
    return history


class _Quiet:
    """stdout for the official epoch: its per-iteration lines dropped, the epoch summary kept."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if text.startswith("Averaged stats"):
            self.stream.write(text.strip() + "\n")
        return len(text)

    def flush(self) -> None:
        pass


def teacher_backbone_state(path: str) -> dict[str, Any]:
    """The teacher backbone's state dict of a main_dino checkpoint, as
    utils.load_pretrained_weights reads it (the `module.` and `backbone.` prefixes removed)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)["teacher"]
    state = {k.replace("module.", ""): v for k, v in state.items()}
    return {k.replace("backbone.", ""): v for k, v in state.items() if k.startswith("backbone.")}


def knn(
    off: Official,
    args: Namespace,
    backbone_state: dict[str, Any],
    train_split: tuple[np.ndarray, np.ndarray],
    test_split: tuple[np.ndarray, np.ndarray],
    k: int,
    temperature: float,
) -> float:
    """eval_knn.py's protocol: the backbone's CLS features of the eval transform (Resize +
    CenterCrop, here to the recipe's eval sizes, then Normalize with the recipe's
    statistics), L2-normalised, classified by eval_knn.knn_classifier; returns top-1 (%)."""
    import torch
    from torchvision import transforms

    model = build_backbone(off, args)
    model.load_state_dict(backbone_state, strict=True)
    model.eval()
    transform = transforms.Compose(
        [
            transforms.Resize(args.eval_resize, interpolation=3),
            transforms.CenterCrop(args.eval_crop),
            transforms.ToTensor(),
            transforms.Normalize(list(args.mean), list(args.std)),
        ]
    )

    def features(split):
        loader = torch.utils.data.DataLoader(
            ArrayImages(*split, transform), batch_size=256, shuffle=False
        )
        chunks = []
        with torch.no_grad():
            for batch, _ in loader:
                chunks.append(model(batch))
        return torch.nn.functional.normalize(torch.cat(chunks), dim=1, p=2)

    train_x, test_x = features(train_split), features(test_split)
    train_y = torch.as_tensor(train_split[1], dtype=torch.long)
    test_y = torch.as_tensor(test_split[1], dtype=torch.long)
    top1, _ = off.eval_knn.knn_classifier(
        train_x, train_y, test_x, test_y, k, temperature, num_classes=int(train_y.max()) + 1
    )
    return float(top1)

"""What the official DINO recipes share, defined once for the recipe files beside this one.

Each function applies the values of one official source (main_dino.py's argparse defaults, a
README command, the args.txt of the released models, the DINO authors' VISSL configs); the
recipe files combine them and set what is theirs alone, and each recipe's docstring gives the
source of every value. The leading underscore keeps this file out of --config=NAME.
"""

import ml_collections

from dino_jax.config import default_config


def main_dino(arch: str, patch_size: int, epochs: int) -> ml_collections.ConfigDict:
    """main_dino.py's argparse defaults with --arch, --patch_size and --epochs given, on
    ImageNet-1k (TFDS imagenet2012; k-NN of the validation split against the train split ten
    times per run). The recipe sets its global batch: main_dino.py has a per-GPU one."""
    c = default_config()
    # default_config() keeps the paper's 10 local crops; main_dino.py --local_crops_number
    # defaults to 8, and every recipe here states its own
    c.aug.n_local = 8
    c.model.arch = arch
    c.model.patch_size = patch_size
    c.optim.epochs = epochs
    c.eval.knn_every_epochs = epochs // 10
    return c


def boosted(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """README, "Boosting DINO performance": --teacher_temp 0.07 --warmup_teacher_temp_epochs 30
    --norm_last_layer false (the args.txt of the released ViT-S/16 and ViT-S/8 have the same
    three; the teacher starts at main_dino.py's --warmup_teacher_temp 0.04)."""
    c.dino.teacher_temp = 0.07
    c.dino.warmup_teacher_temp_epochs = 30
    c.model.norm_last_layer = False
    return c


def released_crops(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The multi-crop of the released ViT-S/16, ViT-B/16 and ViT-B/8 (their args.txt):
    --local_crops_number 10 --global_crops_scale 0.25 1 --local_crops_scale 0.05 0.25."""
    c.aug.n_local = 10
    c.aug.global_scale = (0.25, 1.0)
    c.aug.local_scale = (0.05, 0.25)
    return c


def full_precision(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """--use_fp16 false: the official run computed in float32 without autocast; so do we
    (our default is bfloat16 compute, standing in for main_dino.py's fp16 autocast)."""
    c.model.compute_dtype = "float32"
    return c


def released_vit_base(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """What the released ViT-B/16 and ViT-B/8 share (their args.txt): --use_fp16 false,
    --freeze_last_layer 3, --teacher_temp 0.07 reached over --warmup_teacher_temp_epochs 50,
    --min_lr 2e-06 and the released crops; and the linear probe of the README's
    eval_linear.py commands for vit_base, --n_last_blocks 1 --avgpool_patchtokens true."""
    full_precision(released_crops(c))
    c.optim.freeze_last_layer = 3
    c.optim.min_lr = 2e-6
    c.dino.teacher_temp = 0.07
    c.dino.warmup_teacher_temp_epochs = 50
    c.linear.n_last_blocks = 1
    c.linear.avgpool = True
    c.eval.batch_size = 128
    return c


def resnet50(epochs: int) -> ml_collections.ConfigDict:
    """main_dino.py with --arch resnet50 and the crop scales of both official ResNet-50 runs
    (README command and released args.txt), --global_crops_scale 0.14 1 --local_crops_scale
    0.05 0.14. No stochastic depth: main_dino.py passes --drop_path_rate only to ViTs and
    XCiTs, torchvision's resnet50 has none."""
    c = main_dino("resnet50", 16, epochs)  # --patch_size is not read by a ResNet
    c.model.drop_path_rate = 0.0
    c.aug.global_scale = (0.14, 1.0)
    c.aug.local_scale = (0.05, 0.14)
    return c


def vissl_xcit(arch: str, patch_size: int) -> ml_collections.ConfigDict:
    """What the DINO authors' VISSL configs for XCiT share (configs/config/pretrain/dino/
    dino_16gpus_xcit_small_12_p16.yaml and dino_32gpus_xcit_medium_24_p16.yaml of
    facebookresearch/vissl): 300 epochs, global batch 1024, peak lr 0.001 at batch 1024 (0.00025
    per 256) after 10 warm-up epochs (0.0333 of 300), no gradient clipping, prototypes frozen
    for the first epoch (1251 iterations), teacher temperature 0.04 -> 0.07 over 30 epochs,
    normalize_last_layer false, 8 local crops of scale (0.05, 0.3) and global crops of (0.3, 1);
    momentum 0.996 and weight decay 0.04 -> 0.4 as main_dino.py."""
    c = boosted(main_dino(arch, patch_size, 300))
    c.optim.batch_size = 1024
    c.optim.lr = 0.00025
    c.optim.clip_grad = 0.0
    c.aug.global_scale = (0.3, 1.0)
    c.aug.local_scale = (0.05, 0.3)
    return c

"""ViT-S/8 as released by DINO (800 epochs): the args.txt of dino_deitsmall8_pretrain.

Reproduces: the released ViT-S/8 of the facebookresearch/dino README (dino_deitsmall8_pretrain;
           its "args" link, dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/args.txt).
Command:   python train.py --config=vit_small8 \
             --config.data.data_dir=$TFDS_DIR --config.data.manual_dir=$IMAGENET_TARS
Needs:     the tfds extra, pip install 'dino_jax[tfds]' (TensorFlow and TFDS).
Hardware:  official: 64 V100-32GB GPUs x --batch_size_per_gpu 16 = global batch 1024 (the
           authors in facebookresearch/dino issue #104). Patch 8 gives 785 tokens per global
           crop, about 4x the compute of ViT-S/16 per image.
Fewer devices: optim.batch_size is the global batch and optim.lr is per 256 images (main_dino's
           linear scaling rule), so --config.optim.batch_size=256 alone scales the peak rate with
           the batch; min_lr and the epoch-based schedules stay as they are. main_dino.py's
           --momentum_teacher help suggests 0.9995 for a batch of 256.
Time:      see `dino-jax-bench step --config=vit_small8`.
Expected:  78.3% k-NN (k = 20) and 79.7% linear top-1 on ImageNet (official README, table of
           released models).
Compute:   float32, as the official run (--use_fp16 false in its args.txt; main_dino.py's
           --patch_size help and issue #104 advise against mixed precision below patch 16).
           --config.model.compute_dtype=bfloat16 is faster but departs from the official run.

Values besides main_dino.py's defaults, from the args.txt as copied in one public repository
(a template of cherti's DINO launcher; the file itself is not in our sources) and issue #104:
  --patch_size 8                     model.patch_size = 8
  --epochs 800                       optim.epochs = 800
  --teacher_temp 0.07                dino.teacher_temp = 0.07 (from --warmup_teacher_temp 0.04)
  --warmup_teacher_temp_epochs 30    dino.warmup_teacher_temp_epochs = 30
  --norm_last_layer false            model.norm_last_layer = False
  --local_crops_number 10            aug.n_local = 10
  --use_fp16 false                   model.compute_dtype = "float32"
  The crop scales stay main_dino.py's (0.4, 1) / (0.05, 0.4), clipping 3.0 and --min_lr 1e-6.
  The authors' VISSL config configs/config/pretrain/dino/dino_64gpus_deits8.yaml (a 300-epoch
  run on the same 64 x 16) has 6 local crops of scales (0.25, 1) / (0.05, 0.25) and a final lr
  of 1e-5 instead: that is a different run from the released one.
"""

import pathlib
import runpy
from types import SimpleNamespace

# the values the official recipes share: configs/_official.py, beside this file
official = SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("_official.py"))))


def get_config():
    c = official.full_precision(official.boosted(official.main_dino("vit_small", 8, epochs=800)))
    c.optim.batch_size = 64 * 16  # 64 GPUs x --batch_size_per_gpu 16
    c.aug.n_local = 10
    c.eval.batch_size = 128
    return c

"""ViT-S/16 as released by DINO (800 epochs): the args.txt of dino_deitsmall16_pretrain.

Reproduces: the released ViT-S/16 of the facebookresearch/dino README (dino_deitsmall16_pretrain;
           its "args" link, dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/args.txt).
Command:   python train.py --config=vit_small16 \
             --config.data.data_dir=$TFDS_DIR --config.data.manual_dir=$IMAGENET_TARS
Needs:     the tfds extra, pip install 'dino_jax[tfds]' (TensorFlow and TFDS).
Hardware:  official (args.txt): world_size 16, 2 nodes x 8 GPUs x --batch_size_per_gpu 64 =
           global batch 1024 (1251 steps per epoch).
Fewer devices: optim.batch_size is the global batch and optim.lr is per 256 images (main_dino's
           linear scaling rule), so --config.optim.batch_size=256 alone scales the peak rate with
           the batch; min_lr and the epoch-based schedules stay as they are. main_dino.py's
           --momentum_teacher help suggests 0.9995 for a batch of 256.
Time:      see `dino-jax-bench step --config=vit_small16`.
Expected:  74.5% k-NN (k = 20) and 77.0% linear top-1 on ImageNet (official README, table of
           released models).
Compute:   float32, as the official run (--use_fp16 false in its args.txt).
           --config.model.compute_dtype=bfloat16 is faster but departs from the official run.

Values besides main_dino.py's defaults, all from the args.txt (read through copies of it in
public repositories: the file itself is not in our sources; the crops are corroborated by
lightly-ai/lightly's ViT-S/16 benchmark, which cites that args.txt):
  --epochs 800                       optim.epochs = 800
  --min_lr 1e-05                     optim.min_lr = 1e-5
  --clip_grad 0                      optim.clip_grad = 0 (no clipping)
  --teacher_temp 0.07                dino.teacher_temp = 0.07 (from --warmup_teacher_temp 0.04)
  --warmup_teacher_temp_epochs 30    dino.warmup_teacher_temp_epochs = 30
  --norm_last_layer false            model.norm_last_layer = False
  --local_crops_number 10            aug.n_local = 10
  --global_crops_scale 0.25 1.0      aug.global_scale = (0.25, 1.0)
  --local_crops_scale 0.05 0.25      aug.local_scale = (0.05, 0.25)
  --use_fp16 false                   model.compute_dtype = "float32"
"""

import pathlib
import runpy
from types import SimpleNamespace

# the values the official recipes share: configs/_official.py, beside this file
official = SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("_official.py"))))


def get_config():
    c = official.main_dino("vit_small", 16, epochs=800)
    official.full_precision(official.released_crops(official.boosted(c)))
    c.optim.batch_size = 16 * 64  # world_size 16 x --batch_size_per_gpu 64
    c.optim.min_lr = 1e-5
    c.optim.clip_grad = 0.0
    return c

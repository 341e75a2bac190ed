"""ViT-B/16 as released by DINO (400 epochs): the args.txt of dino_vitbase16_pretrain.

Reproduces: the released ViT-B/16 of the facebookresearch/dino README (dino_vitbase16_pretrain;
           its "args" link, dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/args.txt).
Command:   python train.py --config=vit_base16 \
             --config.data.data_dir=$TFDS_DIR --config.data.manual_dir=$IMAGENET_TARS
Needs:     the tfds extra, pip install 'dino_jax[tfds]' (TensorFlow and TFDS).
Hardware:  official (args.txt): world_size 32, 4 nodes x 8 GPUs x --batch_size_per_gpu 32 =
           global batch 1024 (the authors' VISSL config dino_32gpus_deit_b16.yaml has the same
           32 x 32; the README's multi-node example for vit_base shows 2 nodes of 32-GB V100s).
           With less memory per accelerator set --config.train.fsdp=True or a smaller batch.
Fewer devices: optim.batch_size is the global batch and optim.lr is per 256 images (main_dino's
           linear scaling rule), so --config.optim.batch_size=256 alone scales the peak rate with
           the batch; min_lr and the epoch-based schedules stay as they are. main_dino.py's
           --momentum_teacher help suggests 0.9995 for a batch of 256.
Time:      see `dino-jax-bench step --config=vit_base16` (README, "Speed", has figures).
Expected:  76.1% k-NN (k = 20) and 78.2% linear top-1 on ImageNet (official README, table of
           released models; linear with --n_last_blocks 1 --avgpool_patchtokens true).
Compute:   float32, as the official run (--use_fp16 false in its args.txt).
           --config.model.compute_dtype=bfloat16 is faster but departs from the official run.

Values besides main_dino.py's defaults, all from the args.txt (read through copies of it in
public repositories: jiachenzhu/DyT other_tasks/DINO/README.md and two others; the file itself
is not in our sources):
  --arch vit_base                    model.arch = "vit_base"
  --epochs 400                       optim.epochs = 400
  --lr 0.00075                       optim.lr = 0.00075 (per 256 images)
  --min_lr 2e-06                     optim.min_lr = 2e-6
  --clip_grad 0.3                    optim.clip_grad = 0.3
  --freeze_last_layer 3              optim.freeze_last_layer = 3
  --teacher_temp 0.07                dino.teacher_temp = 0.07 (from --warmup_teacher_temp 0.04)
  --warmup_teacher_temp_epochs 50    dino.warmup_teacher_temp_epochs = 50
  --local_crops_number 10            aug.n_local = 10
  --global_crops_scale 0.25 1.0      aug.global_scale = (0.25, 1.0)
  --local_crops_scale 0.05 0.25      aug.local_scale = (0.05, 0.25)
  --use_fp16 false                   model.compute_dtype = "float32"
  Linear probe (README's eval_linear.py command for vit_base): --n_last_blocks 1
  --avgpool_patchtokens true -> linear.n_last_blocks = 1, linear.avgpool = True.
  The VISSL config agrees on the clipping, the 3 frozen epochs, the 50-epoch teacher warm-up
  and fp32, but has 8 local crops of main_dino.py's scales and lr 0.0005 per 256.
"""

import pathlib
import runpy
from types import SimpleNamespace

# the values the official recipes share: configs/_official.py, beside this file
official = SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("_official.py"))))


def get_config():
    c = official.released_vit_base(official.main_dino("vit_base", 16, epochs=400))
    c.optim.batch_size = 32 * 32  # world_size 32 x --batch_size_per_gpu 32
    c.optim.lr = 0.00075
    c.optim.clip_grad = 0.3
    return c

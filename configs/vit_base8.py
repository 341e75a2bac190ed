"""ViT-B/8 as released by DINO (300 epochs): the args.txt of dino_vitbase8_pretrain.

Reproduces: the released ViT-B/8 of the facebookresearch/dino README (dino_vitbase8_pretrain;
           its "args" link, dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/args.txt).
Command:   python train.py --config=vit_base8 \
             --config.data.data_dir=$TFDS_DIR --config.data.manual_dir=$IMAGENET_TARS
Needs:     the tfds extra, pip install 'dino_jax[tfds]' (TensorFlow and TFDS).
Hardware:  official: --batch_size_per_gpu 6 (args.txt) on 176 GPUs = global batch 1056. The
           GPU count is not confirmed: it is that of jiachenzhu/DyT's reproduction of this
           args.txt (22 nodes x 8), whose ViT-B/16 node count matches that run's world_size.
           Patch 8 gives 785 tokens per global crop: about 4x ViT-B/16's compute per image;
           --config.train.fsdp=True or a smaller batch where memory is short.
Fewer devices: optim.batch_size is the global batch and optim.lr is per 256 images (main_dino's
           linear scaling rule), so --config.optim.batch_size=256 alone scales the peak rate with
           the batch; min_lr and the epoch-based schedules stay as they are. main_dino.py's
           --momentum_teacher help suggests 0.9995 for a batch of 256.
Time:      see `dino-jax-bench step --config=vit_base8`.
Expected:  77.4% k-NN (k = 20) and 80.1% linear top-1 on ImageNet (official README, table of
           released models; linear with --n_last_blocks 1 --avgpool_patchtokens true).
Compute:   float32, as the official run (--use_fp16 false in its args.txt).
           --config.model.compute_dtype=bfloat16 is faster but departs from the official run.

Values besides main_dino.py's defaults, all from the args.txt (read through copies of it in
public repositories: jiachenzhu/DyT other_tasks/DINO/README.md and a template of cherti's DINO
launcher; the file itself is not in our sources):
  --arch vit_base --patch_size 8     model.arch = "vit_base", model.patch_size = 8
  --epochs 300                       optim.epochs = 300
  --min_lr 2e-06                     optim.min_lr = 2e-6
  --freeze_last_layer 3              optim.freeze_last_layer = 3
  --warmup_teacher_temp 0.03         dino.warmup_teacher_temp = 0.03
  --teacher_temp 0.07                dino.teacher_temp = 0.07
  --warmup_teacher_temp_epochs 50    dino.warmup_teacher_temp_epochs = 50
  --local_crops_number 10            aug.n_local = 10
  --global_crops_scale 0.25 1.0      aug.global_scale = (0.25, 1.0)
  --local_crops_scale 0.05 0.25      aug.local_scale = (0.05, 0.25)
  --use_fp16 false                   model.compute_dtype = "float32"
  Linear probe (README's eval_linear.py command for vit_base): --n_last_blocks 1
  --avgpool_patchtokens true -> linear.n_last_blocks = 1, linear.avgpool = True.
  --lr 0.0005 and --clip_grad 3.0 are main_dino.py's defaults, unlike ViT-B/16's.
"""

import pathlib
import runpy
from types import SimpleNamespace

# the values the official recipes share: configs/_official.py, beside this file
official = SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("_official.py"))))


def get_config():
    c = official.released_vit_base(official.main_dino("vit_base", 8, epochs=300))
    c.optim.batch_size = 176 * 6  # 176 GPUs (unconfirmed) x --batch_size_per_gpu 6
    c.dino.warmup_teacher_temp = 0.03
    return c

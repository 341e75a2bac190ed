"""XCiT-S12/16 trained with DINO (300 epochs), as the DINO authors' VISSL config for it.

Reproduces: the released xcit_small_12_p16 of the facebookresearch/dino README
           (dino_xcit_small_12_p16_pretrain). Its args.txt is not in our sources: the values
           are those of the DINO authors' VISSL config for this model, facebookresearch/vissl
           configs/config/pretrain/dino/dino_16gpus_xcit_small_12_p16.yaml.
Command:   python train.py --config=xcit_small_12_p16 \
             --config.data.data_dir=$TFDS_DIR --config.data.manual_dir=$IMAGENET_TARS
Needs:     the tfds extra, pip install 'dino_jax[tfds]' (TensorFlow and TFDS).
Hardware:  official (VISSL config): 2 nodes x 8 GPUs x 64 images = global batch 1024.
Fewer devices: optim.batch_size is the global batch and optim.lr is per 256 images (main_dino's
           linear scaling rule), so --config.optim.batch_size=256 alone scales the peak rate with
           the batch; min_lr and the epoch-based schedules stay as they are. main_dino.py's
           --momentum_teacher help suggests 0.9995 for a batch of 256.
Time:      see `dino-jax-bench step --config=xcit_small_12_p16`.
Expected:  76.0% k-NN (k = 20) and 77.8% linear top-1 on ImageNet (official README, XCiT table).
Compute:   bfloat16 with float32 parameters, where the VISSL config used mixed precision
           (AMP_PARAMS.USE_AMP true).

Values besides main_dino.py's defaults, all from the VISSL config, as main_dino.py flags:
  --arch xcit_small_12_p16           model.arch = "xcit_small_12_p16", model.patch_size = 16
  --epochs 300                       optim.epochs = 300 (num_epochs)
  --lr 0.00025                       optim.lr = 0.00025 per 256 (0.001 at batch 1024)
  --min_lr 4e-05                     optim.min_lr = 4e-5 (the cosine's end_value)
  --clip_grad 0                      optim.clip_grad = 0 (GRAD_CLIP off, VISSL's default)
  --teacher_temp 0.07                dino.teacher_temp = 0.07 (teacher_temp_max)
  --warmup_teacher_temp_epochs 30    dino.warmup_teacher_temp_epochs = 30 (37530 iterations)
  --norm_last_layer false            model.norm_last_layer = False
  --drop_path_rate 0.05              model.drop_path_rate = 0.05 (DROP_PATH_RATE)
  --global_crops_scale 0.3 1         aug.global_scale = (0.3, 1.0)
  --local_crops_scale 0.05 0.3       aug.local_scale = (0.05, 0.3)
  The rest is main_dino.py's: 8 local crops, 10 warm-up epochs (0.0333 of 300), the last
  layer frozen for 1 epoch (1251 iterations), momentum 0.996, weight decay 0.04 -> 0.4.
"""

import pathlib
import runpy
from types import SimpleNamespace

# the values the official recipes share: configs/_official.py, beside this file
official = SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("_official.py"))))


def get_config():
    c = official.vissl_xcit("xcit_small_12_p16", 16)
    c.optim.min_lr = 4e-5
    c.model.drop_path_rate = 0.05
    return c

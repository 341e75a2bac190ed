"""XCiT-S12/8 trained with DINO (300 epochs): the XCiT-S12/16 recipe at patch 8 (unconfirmed).

Reproduces: the released xcit_small_12_p8 of the facebookresearch/dino README
           (dino_xcit_small_12_p8_pretrain). Neither its args.txt nor an official config for
           this model is in our sources: this is the recipe of configs/xcit_small_12_p16.py (the
           DINO authors' VISSL config dino_16gpus_xcit_small_12_p16.yaml) with 8 x 8 patches,
           an assumption to check against that args.txt.
Command:   python train.py --config=xcit_small_12_p8 \
             --config.data.data_dir=$TFDS_DIR --config.data.manual_dir=$IMAGENET_TARS
Needs:     the tfds extra, pip install 'dino_jax[tfds]' (TensorFlow and TFDS).
Hardware:  official: not known; global batch 1024 here, as the p16 recipe. Patch 8 gives 4x the
           tokens of patch 16 (XCiT's attention is linear in them).
Fewer devices: optim.batch_size is the global batch and optim.lr is per 256 images (main_dino's
           linear scaling rule), so --config.optim.batch_size=256 alone scales the peak rate with
           the batch; min_lr and the epoch-based schedules stay as they are. main_dino.py's
           --momentum_teacher help suggests 0.9995 for a batch of 256.
Time:      see `dino-jax-bench step --config=xcit_small_12_p8`.
Expected:  77.1% k-NN (k = 20) and 79.2% linear top-1 on ImageNet (official README, XCiT table).
Compute:   bfloat16 with float32 parameters: mixed precision as the p16 VISSL config and as
           VISSL's XCiT-M24/8 config (pretrain/dino/models_in1k/xcit_medium_layers24_p8.yaml).

Values besides main_dino.py's defaults (those of the p16 VISSL config, as main_dino.py flags):
  --arch xcit_small_12_p8            model.arch = "xcit_small_12_p8", model.patch_size = 8
                                     (the name fixes the patch: main_dino.py's
                                     --patch_size is read by ViTs only)
  --epochs 300                       optim.epochs = 300
  --lr 0.00025                       optim.lr = 0.00025 per 256 (0.001 at batch 1024)
  --min_lr 4e-05                     optim.min_lr = 4e-5
  --clip_grad 0                      optim.clip_grad = 0
  --teacher_temp 0.07                dino.teacher_temp = 0.07
  --warmup_teacher_temp_epochs 30    dino.warmup_teacher_temp_epochs = 30
  --norm_last_layer false            model.norm_last_layer = False
  --drop_path_rate 0.05              model.drop_path_rate = 0.05
  --global_crops_scale 0.3 1         aug.global_scale = (0.3, 1.0)
  --local_crops_scale 0.05 0.3       aug.local_scale = (0.05, 0.3)
  The rest is main_dino.py's: 8 local crops, 10 warm-up epochs, the last layer frozen for 1
  epoch, momentum 0.996, weight decay 0.04 -> 0.4.
"""

import pathlib
import runpy
from types import SimpleNamespace

# the values the official recipes share: configs/_official.py, beside this file
official = SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("_official.py"))))


def get_config():
    c = official.vissl_xcit("xcit_small_12_p8", 8)
    c.optim.min_lr = 4e-5
    c.model.drop_path_rate = 0.05
    c.eval.batch_size = 128
    return c

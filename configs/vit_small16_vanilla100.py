"""ViT-S/16, DINO's vanilla run: the official README's 100-epoch command, main_dino.py's defaults.

Reproduces: facebookresearch/dino README, "Vanilla DINO training": `python -m
           torch.distributed.launch --nproc_per_node=8 main_dino.py --arch vit_small` (no other
           flag: every value is main_dino.py's argparse default).
Command:   python train.py --config=vit_small16_vanilla100 \
             --config.data.data_dir=$TFDS_DIR --config.data.manual_dir=$IMAGENET_TARS
Needs:     the tfds extra, pip install 'dino_jax[tfds]' (TensorFlow and TFDS).
Hardware:  official: one node of 8 GPUs x --batch_size_per_gpu 64 = global batch 512 (2502
           steps per epoch; 1.75 days, README).
Fewer devices: optim.batch_size is the global batch and optim.lr is per 256 images (main_dino's
           linear scaling rule), so --config.optim.batch_size=256 alone halves the peak rate with
           the batch; min_lr and the epoch-based schedules stay as they are. main_dino.py's
           --momentum_teacher help suggests 0.9995 for a batch of 256.
Time:      see `dino-jax-bench step --config=vit_small16_vanilla100`.
Expected:  69.3% k-NN (k = 20) and 74.0% linear top-1 on ImageNet (official README, this run).
Compute:   bfloat16 with float32 parameters, where the official run used fp16 autocast
           (--use_fp16 true, main_dino.py's default).

Values besides main_dino.py's defaults: none. (--local_crops_number stays 8, its default.)
"""

import pathlib
import runpy
from types import SimpleNamespace

# the values the official recipes share: configs/_official.py, beside this file
official = SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("_official.py"))))


def get_config():
    c = official.main_dino("vit_small", 16, epochs=100)
    c.optim.batch_size = 8 * 64  # 8 GPUs x --batch_size_per_gpu 64
    return c

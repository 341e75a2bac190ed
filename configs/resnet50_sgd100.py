"""ResNet-50 with SGD for 100 epochs on 8 GPUs: the official README's ResNet-50 command.

Reproduces: facebookresearch/dino README, "ResNet-50 and other convnets trainings": `python -m
           torch.distributed.launch --nproc_per_node=8 main_dino.py --arch resnet50 --optimizer
           sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1
           --local_crops_scale 0.05 0.14`, the authors' advice for smaller batches (issue #133).
Command:   python train.py --config=resnet50_sgd100 \
             --config.data.data_dir=$TFDS_DIR --config.data.manual_dir=$IMAGENET_TARS
Needs:     the tfds extra, pip install 'dino_jax[tfds]' (TensorFlow and TFDS).
Hardware:  official: one node of 8 GPUs x --batch_size_per_gpu 64 = global batch 512.
Fewer devices: optim.batch_size is the global batch and optim.lr is per 256 images (main_dino's
           linear scaling rule), so --config.optim.batch_size=256 alone scales the peak rate with
           the batch; min_lr and the epoch-based schedules stay as they are. main_dino.py's
           --momentum_teacher help suggests 0.9995 for a batch of 256.
Time:      see `dino-jax-bench step --config=resnet50_sgd100`.
Expected:  no accuracy is published for this run: the README gives its training log
           (example_runs_logs/dino_rn50_log.txt) and final checkpoint only. The released
           ResNet-50 (configs/resnet50.py, 800 epochs, LARS) reaches 67.5% k-NN / 75.3% linear.
Compute:   bfloat16 with float32 parameters, where the official run used fp16 autocast
           (--use_fp16 true, main_dino.py's default).

Values besides main_dino.py's defaults, all from the README command above:
  --arch resnet50                    model.arch = "resnet50"
  --optimizer sgd                    optim.optimizer = "sgd" (momentum 0.9, as main_dino.py)
  --lr 0.03                          optim.lr = 0.03 (per 256 images)
  --weight_decay 1e-4                optim.weight_decay = 1e-4
  --weight_decay_end 1e-4            optim.weight_decay_end = 1e-4
  --global_crops_scale 0.14 1        aug.global_scale = (0.14, 1.0)
  --local_crops_scale 0.05 0.14      aug.local_scale = (0.05, 0.14)
  --drop_path_rate: main_dino.py gives it only to ViTs and XCiTs, and a ResNet has no
  stochastic depth: model.drop_path_rate = 0.
  (--local_crops_number stays 8 and --use_bn_in_head false, their defaults.)
"""

import pathlib
import runpy
from types import SimpleNamespace

# the values the official recipes share: configs/_official.py, beside this file
official = SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("_official.py"))))


def get_config():
    c = official.resnet50(epochs=100)
    c.optim.batch_size = 8 * 64  # 8 GPUs x --batch_size_per_gpu 64
    c.optim.optimizer = "sgd"
    c.optim.lr = 0.03
    c.optim.weight_decay = 1e-4
    c.optim.weight_decay_end = 1e-4
    return c

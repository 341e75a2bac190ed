"""ResNet-50 as released by DINO (800 epochs, LARS): the args.txt of dino_resnet50_pretrain.

Reproduces: the released ResNet-50 of the facebookresearch/dino README (dino_resnet50_pretrain;
           its "args" link, dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/args.txt). The
           authors confirm in facebookresearch/dino issue #133 that these are the arguments of
           the released checkpoint, a large-batch run; for small batches they point to the
           README command (configs/resnet50_sgd100.py).
Command:   python train.py --config=resnet50 \
             --config.data.data_dir=$TFDS_DIR --config.data.manual_dir=$IMAGENET_TARS
Needs:     the tfds extra, pip install 'dino_jax[tfds]' (TensorFlow and TFDS).
Hardware:  official: 80 GPUs x --batch_size_per_gpu 51 = global batch 4080 (args.txt and issue
           #133).
Fewer devices: optim.batch_size is the global batch and optim.lr is per 256 images (main_dino's
           linear scaling rule), so --config.optim.batch_size=1024 alone scales the peak rate
           with the batch; min_lr and the epoch-based schedules stay as they are. LARS is meant
           for large batches: for a few devices the authors suggest the SGD recipe instead.
Time:      see `dino-jax-bench step --config=resnet50`.
Expected:  67.5% k-NN (k = 20) and 75.3% linear top-1 on ImageNet (official README, table of
           released models).
Compute:   float32, as the official run (--use_fp16 false in its args.txt).
           --config.model.compute_dtype=bfloat16 is faster but departs from the official run.

Values besides main_dino.py's defaults, from the args.txt as copied in a public repository's
README (SSL_MFE, "Official DINO paper args"; the file itself is not in our sources), whose
batch and GPU count agree with issue #133:
  --arch resnet50                    model.arch = "resnet50"
  --optimizer lars                   optim.optimizer = "lars"
  --lr 0.3                           optim.lr = 0.3 (per 256 images)
  --min_lr 0.0048                    optim.min_lr = 0.0048
  --weight_decay 1e-06               optim.weight_decay = 1e-6
  --weight_decay_end 1e-06           optim.weight_decay_end = 1e-6
  --clip_grad 0                      optim.clip_grad = 0 (no clipping)
  --epochs 800                       optim.epochs = 800
  --teacher_temp 0.07                dino.teacher_temp = 0.07 (from --warmup_teacher_temp 0.04)
  --warmup_teacher_temp_epochs 50    dino.warmup_teacher_temp_epochs = 50
  --out_dim 60000                    model.out_dim = 60000
  --use_bn_in_head true              model.use_bn_in_head = True
  --local_crops_number 6             aug.n_local = 6
  --global_crops_scale 0.14 1.0      aug.global_scale = (0.14, 1.0)
  --local_crops_scale 0.05 0.14      aug.local_scale = (0.05, 0.14)
  --use_fp16 false                   model.compute_dtype = "float32"
  --drop_path_rate: not in this args.txt; main_dino.py gives it only to ViTs and XCiTs, and a
  ResNet has no stochastic depth: model.drop_path_rate = 0.
  The head is main_dino.py's DINOHead (3 layers, hidden 2048): one public loader of the full
  checkpoint suggests the released head differs (2 layers, hidden 4096), which
  main_dino.py's flags cannot express; set model.head_nlayers / head_hidden_dim to try it.
"""

import pathlib
import runpy
from types import SimpleNamespace

# the values the official recipes share: configs/_official.py, beside this file
official = SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("_official.py"))))


def get_config():
    c = official.full_precision(official.resnet50(epochs=800))
    c.optim.batch_size = 80 * 51  # 80 GPUs x --batch_size_per_gpu 51
    c.optim.optimizer = "lars"
    c.optim.lr = 0.3
    c.optim.min_lr = 0.0048
    c.optim.weight_decay = 1e-6
    c.optim.weight_decay_end = 1e-6
    c.optim.clip_grad = 0.0
    c.dino.teacher_temp = 0.07
    c.dino.warmup_teacher_temp_epochs = 50
    c.model.out_dim = 60000
    c.model.use_bn_in_head = True
    c.aug.n_local = 6
    return c

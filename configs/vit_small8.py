"""ViT-S/8 with the official DINO recipe on ImageNet-1k (patch 8: 785 tokens per global crop).

Command:   python train.py --config=vit_small8 \
             --config.data.data_dir=$TFDS_DIR --config.data.manual_dir=$IMAGENET_TARS
Needs:     the tfds extra, pip install 'dino_jax[tfds]' (TensorFlow and TFDS).
Hardware:  about 4x the compute of ViT-S/16 per image; 16 or more accelerators for the global
           batch of 1024, or set train.fsdp / a lower optim.batch_size.
Time:      measure with `dino-jax-bench step --config=vit_small8`.
Expected:  the released official ViT-S/8 (800 epochs) reaches 78.3% k-NN (k = 20) and 79.7%
           linear (official README).
"""

from dino_jax.config import default_config


def get_config():
    c = default_config()  # main_dino.py defaults
    c.model.arch = "vit_small"
    c.model.patch_size = 8
    c.optim.batch_size = 1024
    c.optim.epochs = 800
    c.aug.n_local = 10
    c.data.source = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.data.eval_train_split = "train"
    c.data.eval_test_split = "validation"
    c.eval.knn_every_epochs = 20
    c.eval.batch_size = 128
    return c

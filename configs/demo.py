"""Demo: a small ViT trained with DINO on the bundled Fashion-MNIST subset, on a laptop CPU.

Command:   python train.py                  (this config is the default)
           python train.py --config=configs/demo.py --workdir=workdirs/demo
Hardware:  any CPU (measured on 2 cores); a GPU finishes in well under a minute.
Time:      about 8 minutes on 2 CPU cores, k-NN evaluation included.
Expected:  k-NN top-1 (k = 20) on the bundled 2,000-image test split well above the same
           network at its random initialisation; see README ("Demo") for the measured figures.
"""

from dino_jax.config import default_config


def get_config():
    c = default_config()
    c.model.arch = "custom"
    c.model.embed_dim = 192
    c.model.depth = 4
    c.model.num_heads = 3
    c.model.patch_size = 4
    c.model.drop_path_rate = 0.0
    c.model.out_dim = 4096
    c.model.head_hidden_dim = 512
    c.model.compute_dtype = "float32"

    c.dino.warmup_teacher_temp = 0.04
    c.dino.teacher_temp = 0.04
    c.dino.momentum_teacher = 0.99

    c.optim.batch_size = 64
    c.optim.epochs = 3
    c.optim.lr = 0.0005
    c.optim.warmup_epochs = 1
    c.optim.freeze_last_layer = 1

    c.aug.global_size = 32
    c.aug.local_size = 16
    c.aug.n_local = 6
    c.aug.global_scale = (0.4, 1.0)
    c.aug.local_scale = (0.1, 0.4)
    # Fashion-MNIST statistics (grey images replicated to RGB)
    c.aug.mean = (0.286, 0.286, 0.286)
    c.aug.std = (0.353, 0.353, 0.353)

    c.data.source = "demo"
    c.data.split = "train"
    c.data.eval_train_split = "train"
    c.data.eval_test_split = "test"
    c.data.canvas_size = 28

    c.train.log_every_steps = 20
    c.train.checkpoint_every_steps = 100

    c.eval.resize = 32
    c.eval.crop = 32
    c.eval.batch_size = 512
    c.eval.attention_images = 4
    return c

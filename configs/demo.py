"""Demo: a small ViT trained with DINO on the bundled Fashion-MNIST subset, on a laptop CPU.

Command:   python train.py                  (this config is the default; work dir workdirs/demo)
Hardware:  any CPU (measured on 2 cores); an accelerator finishes it in about a minute.
Time:      6.5 minutes on 2 CPU cores (Xeon VM), evaluations included.
Expected:  k-NN top-1 (k = 20) on the bundled 2,000-image test split of 70.75%, against
           64.85% for the same network at its random initialisation and 82.25% for raw pixels
           (all three are printed at the end; README, "The demo", has a measured run).

Sizes are cut down from the ImageNet recipe to fit 28 x 28 images and a CPU: a 4-block ViT of
width 96 with 7 x 7 patches, 2 global crops of 28 px and 4 local crops of 14 px, 1,024
prototypes, batch 64 for 10 epochs. The learning rate is raised (0.002 per 256 images) and the
teacher follows faster (momentum 0.99) because the run is short; the last layer is not frozen.
"""

from dino_jax.config import default_config


def get_config():
    c = default_config()
    c.model.arch = "custom"
    c.model.embed_dim = 96
    c.model.depth = 4
    c.model.num_heads = 3
    c.model.patch_size = 7
    c.model.drop_path_rate = 0.0
    c.model.out_dim = 1024
    c.model.head_hidden_dim = 512
    c.model.compute_dtype = "float32"

    c.dino.warmup_teacher_temp = 0.04
    c.dino.teacher_temp = 0.04
    c.dino.momentum_teacher = 0.99

    c.optim.batch_size = 64
    c.optim.epochs = 10
    c.optim.lr = 0.002
    c.optim.warmup_epochs = 1
    c.optim.freeze_last_layer = 0

    c.aug.global_size = 28
    c.aug.local_size = 14
    c.aug.n_local = 4
    # Fashion-MNIST statistics (grey images replicated to RGB)
    c.aug.mean = (0.286, 0.286, 0.286)
    c.aug.std = (0.353, 0.353, 0.353)

    c.data.source = "demo"
    c.data.split = "train"
    c.data.eval_train_split = "train"
    c.data.eval_test_split = "test"
    c.data.canvas_size = 28

    c.train.log_every_steps = 20
    c.train.checkpoint_every_steps = 200

    c.eval.resize = 28
    c.eval.crop = 28
    c.eval.batch_size = 512
    c.eval.attention_images = 4
    c.eval.report_baselines = True
    return c

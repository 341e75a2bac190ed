"""A tiny but complete configuration (bundled demo data) for fast end-to-end tests."""

from dino_jax.config import default_config, dotted


def tiny_config(**overrides):
    c = default_config()
    c.model.arch = "custom"
    c.model.embed_dim = 16
    c.model.depth = 1
    c.model.num_heads = 2
    c.model.patch_size = 4
    c.model.out_dim = 64
    c.model.head_hidden_dim = 32
    c.model.head_bottleneck_dim = 16
    c.model.compute_dtype = "float32"
    c.model.drop_path_rate = 0.1
    c.optim.batch_size = 16
    c.optim.epochs = 2
    c.optim.warmup_epochs = 1
    c.aug.global_size = 16
    c.aug.local_size = 8
    c.aug.n_local = 2
    c.data.source = "demo"
    c.data.split = "test"  # 2,000 images: 125 steps per epoch at batch 16
    c.data.canvas_size = 28
    c.data.eval_train_split = ""
    c.data.eval_test_split = ""
    c.train.log_every_steps = 2
    c.train.checkpoint_every_steps = 3
    c.train.progress_bar = False
    c.eval.resize = 16
    c.eval.crop = 16
    for key, value in overrides.items():
        node, leaf = dotted(c, key)
        node[leaf] = value
    return c


def data_config(**overrides):
    """`config.data` for pipeline tests: the real key set, small and quick settings."""
    d = default_config().data
    d.source = "demo"
    d.split = "train"
    d.eval_train_split = "train"
    d.eval_test_split = "test"
    d.tfds_name = ""
    d.canvas_size = 32
    d.shuffle_buffer = 100
    d.num_parallel_calls = 2
    d.synthetic_examples = 0
    d.synthetic_classes = 0
    d.update(overrides)
    return d


def tiny_eval_config(max_steps: int = 2):
    """tiny_config with a width-32 ViT and a one-layer head, for evaluation tests: trained for
    `max_steps` without evaluating inside train()."""
    c = tiny_config(**{"data.split": "train", "data.eval_train_split": "train"})
    c.model.embed_dim, c.model.depth, c.model.num_heads = 32, 1, 2
    c.model.out_dim, c.model.head_hidden_dim, c.model.head_bottleneck_dim = 64, 32, 16
    c.model.head_nlayers = 1
    c.optim.batch_size = 8
    c.aug.global_size, c.aug.local_size, c.aug.n_local = 16, 8, 0
    c.eval.resize = c.eval.crop = 16
    c.data.eval_test_split = ""  # no evaluation inside train()
    c.train.max_steps = max_steps
    return c


# Evaluation of the fixture backbone (ViT/8, 32 px) on 64 synthetic images: seconds on a CPU.
SMALL_EVAL_DATA = [
    "--config.data.source=synthetic",
    "--config.data.synthetic_examples=64",
    "--config.data.synthetic_classes=3",
    "--config.data.canvas_size=40",
    "--config.eval.resize=32",
    "--config.eval.crop=32",
    "--config.eval.batch_size=16",
]


# Overrides of tiny_config / tiny_eval_config that swap the ViT for a small ResNet or XCiT.
TINY_RESNET = {
    "model.arch": "resnet",
    "model.embed_dim": None,
    "model.depth": None,
    "model.num_heads": None,
    "model.drop_path_rate": 0.0,  # torchvision's ResNet has no stochastic depth
    "model.resnet_stem_width": 4,
    "model.resnet_widths": (4, 8, 8, 8),
    "model.resnet_depths": (1, 1, 1, 1),
}
TINY_XCIT = {"model.arch": "xcit", "model.embed_dim": 16, "model.patch_size": 8}


# A bundled demo recipe cut to test size: smaller batch and crops, no evaluation, a few steps.
DEMO_AT_TEST_SIZE = {
    "optim.batch_size": 16,
    "aug.n_local": 2,
    "data.split": "test",
    "data.eval_train_split": "",
    "data.eval_test_split": "",
    "eval.report_baselines": False,
    "train.progress_bar": False,
    "train.checkpoint_every_steps": 3,
}


def demo_recipe(name: str, **overrides):
    """configs/`name`.py at test size (DEMO_AT_TEST_SIZE), then `overrides`."""
    from dino_jax import cli

    c = cli.load_config(name)
    for key, value in {**DEMO_AT_TEST_SIZE, **overrides}.items():
        node, leaf = dotted(c, key)
        node[leaf] = value
    return c

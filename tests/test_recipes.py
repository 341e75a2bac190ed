"""The official recipes in configs/ hold the values of the official runs they reproduce.

A table of every recipe-relevant value, per recipe, is checked against each file's
get_config(), so that an edit cannot drift silently; every recipe is in the table and passes
validation; and each docstring names its source, its global batch, its expected accuracy and
the main_dino.py flag of every value that is not main_dino.py's default. The sources of the
values are in the recipes' docstrings and docs/recipes.md.
"""

import pathlib
import runpy

import jax.numpy as jnp
import pytest

from dino_jax import cli, validation
from dino_jax.config import dotted
from dino_jax.models.backbones import build_backbone, family

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOT_OFFICIAL = {"demo", "demo_dinov2", "demo_dinov3"}  # sized for a CPU, not official runs

# The groups of a table row and the config section each belongs to.
SECTION = {
    "model": "model",
    "head": "model",
    "optim": "optim",
    "lr": "optim",
    "wd": "optim",
    "teacher": "dino",
    "aug": "aug",
    "linear": "linear",
}

# main_dino.py's argparse defaults (and eval_linear.py's for the probe), in our keys; bfloat16
# compute stands for --use_fp16 true (fp16 autocast).
MAIN_DINO = {
    "model": dict(arch="vit_small", patch_size=16, drop_path_rate=0.1, compute_dtype="bfloat16"),
    "head": dict(out_dim=65536, norm_last_layer=True, use_bn_in_head=False),
    "optim": dict(optimizer="adamw", epochs=100, warmup_epochs=10, freeze_last_layer=1),
    "lr": dict(lr=0.0005, min_lr=1e-6, clip_grad=3.0),
    "wd": dict(weight_decay=0.04, weight_decay_end=0.4),
    "teacher": dict(
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        momentum_teacher=0.996,
    ),
    "aug": dict(n_local=8, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)),
    "linear": dict(n_last_blocks=4, avgpool=False),
}
# The official flag of each key, which a recipe's docstring names when it changes the value.
FLAGS = {
    "model.arch": "--arch",
    "model.patch_size": "--patch_size",
    "model.drop_path_rate": "--drop_path_rate",
    "model.compute_dtype": "--use_fp16",
    "model.out_dim": "--out_dim",
    "model.norm_last_layer": "--norm_last_layer",
    "model.use_bn_in_head": "--use_bn_in_head",
    "optim.optimizer": "--optimizer",
    "optim.epochs": "--epochs",
    "optim.warmup_epochs": "--warmup_epochs",
    "optim.freeze_last_layer": "--freeze_last_layer",
    "optim.lr": "--lr",
    "optim.min_lr": "--min_lr",
    "optim.clip_grad": "--clip_grad",
    "optim.weight_decay": "--weight_decay",
    "optim.weight_decay_end": "--weight_decay_end",
    "dino.warmup_teacher_temp": "--warmup_teacher_temp",
    "dino.teacher_temp": "--teacher_temp",
    "dino.warmup_teacher_temp_epochs": "--warmup_teacher_temp_epochs",
    "dino.momentum_teacher": "--momentum_teacher",
    "aug.n_local": "--local_crops_number",
    "aug.global_scale": "--global_crops_scale",
    "aug.local_scale": "--local_crops_scale",
    "linear.n_last_blocks": "--n_last_blocks",
    "linear.avgpool": "--avgpool_patchtokens",
}
# Values no official recipe changes (main_dino.py has no flag for most of them).
COMMON = {
    "dino.student_temp": 0.1,
    "dino.center_momentum": 0.9,
    "model.head_nlayers": 3,
    "model.head_hidden_dim": 2048,
    "model.head_bottleneck_dim": 256,
    "model.param_dtype": "float32",
    "aug.global_size": 224,
    "aug.local_size": 96,
    "aug.n_global": 2,
    "data.source": "tfds",
    "data.tfds_name": "imagenet2012",
}

F32, BF16 = "float32", "bfloat16"
VIT_BASE_PROBE = dict(n_last_blocks=1, avgpool=True)
RELEASED_CROPS = dict(n_local=10, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25))
XCIT_CROPS = dict(n_local=8, global_scale=(0.3, 1.0), local_scale=(0.05, 0.3))
# README's boosting: teacher 0.04 -> 0.07 over 30 epochs (the ViT-S releases and XCiTs share it)
BOOSTED_TEACHER = dict(
    warmup_teacher_temp=0.04,
    teacher_temp=0.07,
    warmup_teacher_temp_epochs=30,
    momentum_teacher=0.996,
)
MAIN_WD = MAIN_DINO["wd"]

# name: the expected value of every recipe-relevant key, and (k-NN, linear) top-1 in % from
# the official README (None: no accuracy is published for that run).
EXPECTED = {
    "vit_small16_vanilla100": {
        "model": dict(arch="vit_small", patch_size=16, drop_path_rate=0.1, compute_dtype=BF16),
        "head": dict(out_dim=65536, norm_last_layer=True, use_bn_in_head=False),
        "optim": dict(
            optimizer="adamw", batch_size=512, epochs=100, warmup_epochs=10, freeze_last_layer=1
        ),
        "lr": dict(lr=0.0005, min_lr=1e-6, clip_grad=3.0),
        "wd": MAIN_WD,
        "teacher": MAIN_DINO["teacher"],
        "aug": dict(n_local=8, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)),
        "linear": dict(n_last_blocks=4, avgpool=False),
        "expected": ("69.3", "74.0"),
    },
    "vit_small16_boosted300": {
        "model": dict(arch="vit_small", patch_size=16, drop_path_rate=0.1, compute_dtype=BF16),
        "head": dict(out_dim=65536, norm_last_layer=False, use_bn_in_head=False),
        "optim": dict(
            optimizer="adamw", batch_size=1024, epochs=300, warmup_epochs=10, freeze_last_layer=1
        ),
        "lr": dict(lr=0.0005, min_lr=1e-6, clip_grad=3.0),
        "wd": MAIN_WD,
        "teacher": BOOSTED_TEACHER,
        "aug": dict(n_local=8, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)),
        "linear": dict(n_last_blocks=4, avgpool=False),
        "expected": ("73.3", "76.0"),
    },
    "vit_small16": {
        "model": dict(arch="vit_small", patch_size=16, drop_path_rate=0.1, compute_dtype=F32),
        "head": dict(out_dim=65536, norm_last_layer=False, use_bn_in_head=False),
        "optim": dict(
            optimizer="adamw", batch_size=1024, epochs=800, warmup_epochs=10, freeze_last_layer=1
        ),
        "lr": dict(lr=0.0005, min_lr=1e-5, clip_grad=0.0),
        "wd": MAIN_WD,
        "teacher": BOOSTED_TEACHER,
        "aug": RELEASED_CROPS,
        "linear": dict(n_last_blocks=4, avgpool=False),
        "expected": ("74.5", "77.0"),
    },
    "vit_small8": {
        "model": dict(arch="vit_small", patch_size=8, drop_path_rate=0.1, compute_dtype=F32),
        "head": dict(out_dim=65536, norm_last_layer=False, use_bn_in_head=False),
        "optim": dict(
            optimizer="adamw", batch_size=1024, epochs=800, warmup_epochs=10, freeze_last_layer=1
        ),
        "lr": dict(lr=0.0005, min_lr=1e-6, clip_grad=3.0),
        "wd": MAIN_WD,
        "teacher": BOOSTED_TEACHER,
        "aug": dict(n_local=10, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)),
        "linear": dict(n_last_blocks=4, avgpool=False),
        "expected": ("78.3", "79.7"),
    },
    "vit_base16": {
        "model": dict(arch="vit_base", patch_size=16, drop_path_rate=0.1, compute_dtype=F32),
        "head": dict(out_dim=65536, norm_last_layer=True, use_bn_in_head=False),
        "optim": dict(
            optimizer="adamw", batch_size=1024, epochs=400, warmup_epochs=10, freeze_last_layer=3
        ),
        "lr": dict(lr=0.00075, min_lr=2e-6, clip_grad=0.3),
        "wd": MAIN_WD,
        "teacher": dict(
            warmup_teacher_temp=0.04,
            teacher_temp=0.07,
            warmup_teacher_temp_epochs=50,
            momentum_teacher=0.996,
        ),
        "aug": RELEASED_CROPS,
        "linear": VIT_BASE_PROBE,
        "expected": ("76.1", "78.2"),
    },
    "vit_base8": {
        "model": dict(arch="vit_base", patch_size=8, drop_path_rate=0.1, compute_dtype=F32),
        "head": dict(out_dim=65536, norm_last_layer=True, use_bn_in_head=False),
        "optim": dict(
            optimizer="adamw", batch_size=1056, epochs=300, warmup_epochs=10, freeze_last_layer=3
        ),
        "lr": dict(lr=0.0005, min_lr=2e-6, clip_grad=3.0),
        "wd": MAIN_WD,
        "teacher": dict(
            warmup_teacher_temp=0.03,
            teacher_temp=0.07,
            warmup_teacher_temp_epochs=50,
            momentum_teacher=0.996,
        ),
        "aug": RELEASED_CROPS,
        "linear": VIT_BASE_PROBE,
        "expected": ("77.4", "80.1"),
    },
    "resnet50": {
        "model": dict(arch="resnet50", patch_size=16, drop_path_rate=0.0, compute_dtype=F32),
        "head": dict(out_dim=60000, norm_last_layer=True, use_bn_in_head=True),
        "optim": dict(
            optimizer="lars", batch_size=4080, epochs=800, warmup_epochs=10, freeze_last_layer=1
        ),
        "lr": dict(lr=0.3, min_lr=0.0048, clip_grad=0.0),
        "wd": dict(weight_decay=1e-6, weight_decay_end=1e-6),
        "teacher": dict(
            warmup_teacher_temp=0.04,
            teacher_temp=0.07,
            warmup_teacher_temp_epochs=50,
            momentum_teacher=0.996,
        ),
        "aug": dict(n_local=6, global_scale=(0.14, 1.0), local_scale=(0.05, 0.14)),
        "linear": dict(n_last_blocks=4, avgpool=False),
        "expected": ("67.5", "75.3"),
    },
    "resnet50_sgd100": {
        "model": dict(arch="resnet50", patch_size=16, drop_path_rate=0.0, compute_dtype=BF16),
        "head": dict(out_dim=65536, norm_last_layer=True, use_bn_in_head=False),
        "optim": dict(
            optimizer="sgd", batch_size=512, epochs=100, warmup_epochs=10, freeze_last_layer=1
        ),
        "lr": dict(lr=0.03, min_lr=1e-6, clip_grad=3.0),
        "wd": dict(weight_decay=1e-4, weight_decay_end=1e-4),
        "teacher": MAIN_DINO["teacher"],
        "aug": dict(n_local=8, global_scale=(0.14, 1.0), local_scale=(0.05, 0.14)),
        "linear": dict(n_last_blocks=4, avgpool=False),
        "expected": None,
    },
    "xcit_small_12_p16": {
        "model": dict(
            arch="xcit_small_12_p16", patch_size=16, drop_path_rate=0.05, compute_dtype=BF16
        ),
        "head": dict(out_dim=65536, norm_last_layer=False, use_bn_in_head=False),
        "optim": dict(
            optimizer="adamw", batch_size=1024, epochs=300, warmup_epochs=10, freeze_last_layer=1
        ),
        "lr": dict(lr=0.00025, min_lr=4e-5, clip_grad=0.0),
        "wd": MAIN_WD,
        "teacher": BOOSTED_TEACHER,
        "aug": XCIT_CROPS,
        "linear": dict(n_last_blocks=4, avgpool=False),
        "expected": ("76.0", "77.8"),
    },
    "xcit_small_12_p8": {
        "model": dict(
            arch="xcit_small_12_p8", patch_size=8, drop_path_rate=0.05, compute_dtype=BF16
        ),
        "head": dict(out_dim=65536, norm_last_layer=False, use_bn_in_head=False),
        "optim": dict(
            optimizer="adamw", batch_size=1024, epochs=300, warmup_epochs=10, freeze_last_layer=1
        ),
        "lr": dict(lr=0.00025, min_lr=4e-5, clip_grad=0.0),
        "wd": MAIN_WD,
        "teacher": BOOSTED_TEACHER,
        "aug": XCIT_CROPS,
        "linear": dict(n_last_blocks=4, avgpool=False),
        "expected": ("77.1", "79.2"),
    },
    "xcit_medium_24_p16": {
        "model": dict(
            arch="xcit_medium_24_p16", patch_size=16, drop_path_rate=0.15, compute_dtype=BF16
        ),
        "head": dict(out_dim=65536, norm_last_layer=False, use_bn_in_head=False),
        "optim": dict(
            optimizer="adamw", batch_size=1024, epochs=300, warmup_epochs=10, freeze_last_layer=1
        ),
        "lr": dict(lr=0.00025, min_lr=1e-5, clip_grad=0.0),
        "wd": MAIN_WD,
        "teacher": BOOSTED_TEACHER,
        "aug": XCIT_CROPS,
        "linear": dict(n_last_blocks=4, avgpool=False),
        "expected": ("76.4", "78.8"),
    },
    "xcit_medium_24_p8": {
        "model": dict(
            arch="xcit_medium_24_p8", patch_size=8, drop_path_rate=0.15, compute_dtype=BF16
        ),
        "head": dict(out_dim=65536, norm_last_layer=False, use_bn_in_head=False),
        "optim": dict(
            optimizer="adamw", batch_size=1024, epochs=300, warmup_epochs=10, freeze_last_layer=1
        ),
        "lr": dict(lr=0.00025, min_lr=1e-5, clip_grad=0.0),
        "wd": MAIN_WD,
        "teacher": BOOSTED_TEACHER,
        "aug": XCIT_CROPS,
        "linear": dict(n_last_blocks=4, avgpool=False),
        "expected": ("77.9", "80.3"),
    },
}
# The feature width of each released network (its embed_dim / pooled ResNet width).
FEATURE_WIDTH = {
    "vit_small": 384,
    "vit_base": 768,
    "resnet50": 2048,
    "xcit_small_12_p16": 384,
    "xcit_small_12_p8": 384,
    "xcit_medium_24_p16": 512,
    "xcit_medium_24_p8": 512,
}


def flat(row: dict) -> dict:
    """{"section.key": value} of a table row (its "expected" accuracies left out)."""
    return {
        f"{SECTION[group]}.{key}": value
        for group, values in row.items()
        if group != "expected"
        for key, value in values.items()
    }


def get(config, key: str):
    node, leaf = dotted(config, key)
    return node[leaf]


def mismatches(config, row: dict) -> list[str]:
    """Every key whose value in `config` is not the table's (with both values)."""
    want = {**flat(row), **COMMON}
    return [f"{k}: {get(config, k)!r} != {v!r}" for k, v in want.items() if get(config, k) != v]


def unsourced(doc: str, row: dict) -> list[str]:
    """The keys whose value is not main_dino.py's default and whose official flag or our key
    name the docstring does not mention."""
    defaults = flat(MAIN_DINO)
    return [
        key
        for key, value in flat(row).items()
        if key in defaults and value != defaults[key] and not (FLAGS[key] in doc and key in doc)
    ]


def docstring(name: str) -> str:
    return runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["__doc__"]


def official_base():
    return runpy.run_path(str(ROOT / "configs" / "_official.py"))["main_dino"]("vit_small", 16, 100)


def test_every_recipe_has_a_table_row():
    assert set(cli.recipe_names()) - NOT_OFFICIAL == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_holds_its_official_values(name):
    assert mismatches(cli.load_config(name), EXPECTED[name]) == []


def test_the_table_check_catches_a_drifted_value():
    config = cli.load_config("vit_small16")
    config.optim.min_lr = 1e-6  # main_dino.py's default instead of the release's 1e-5
    config.aug.n_local = 8
    assert mismatches(config, EXPECTED["vit_small16"]) == [
        "optim.min_lr: 1e-06 != 1e-05",
        "aug.n_local: 8 != 10",
    ]


def test_the_shared_base_is_main_dino_defaults():
    """configs/_official.py's main_dino() is main_dino.py's argparse defaults (the table's
    MAIN_DINO), e.g. 8 local crops where default_config() keeps 10."""
    assert mismatches(official_base(), MAIN_DINO) == []


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_validates_without_warnings(name, num_devices):
    config = cli.load_config(name)
    validation.validate(config, num_devices=num_devices)
    assert validation.config_warnings(config) == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_builds_the_released_network(name):
    m = cli.load_config(name).model
    backbone = build_backbone(m, img_size=224, dtype=jnp.float32, param_dtype=jnp.float32)
    assert backbone.embed_dim == FEATURE_WIDTH[m.arch]
    if family(m.arch) != "resnet":
        assert backbone.patch_size == EXPECTED[name]["model"]["patch_size"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_docstring_names_source_batch_accuracy_and_every_changed_flag(name):
    doc = docstring(name)
    row = EXPECTED[name]
    assert "Reproduces:" in doc and "facebookresearch/dino README" in doc
    assert f"--config={name} " in doc
    assert f"global batch {row['optim']['batch_size']}" in doc
    assert "Fewer devices:" in doc and "per 256 images" in doc
    if row["expected"] is None:
        assert "no accuracy is published" in doc
    else:
        knn, linear = row["expected"]
        assert f"{knn}% k-NN (k = 20) and {linear}% linear top-1" in doc
    assert unsourced(doc, row) == []


def test_the_docstring_check_catches_an_unsourced_value():
    doc = docstring("vit_base16")
    row = EXPECTED["vit_base16"]
    without = "\n".join(line for line in doc.splitlines() if "--clip_grad" not in line)
    assert unsourced(doc, row) == [] and unsourced(without, row) == ["optim.clip_grad"]

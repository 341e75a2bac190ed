"""Invalid settings are refused by validation, before anything is written or compiled, with a
message that says what to change; settings that depend on the data's sizes are checked once
the data is listed, still before the work directory is made; the command line refuses keys
that do not exist."""

import logging

import jax
import ml_collections
import pytest
from helpers.fault_config import train_py
from helpers.tiny import TINY_RESNET, tiny_config
from PIL import Image

from dino_jax import parallel
from dino_jax.config import ConfigError, dotted
from dino_jax.data.sources import DataError
from dino_jax.run_start import preflight
from dino_jax.trainer import train

NEVER_THERE = "/nonexistent/dino_jax"


def set_values(**values):
    def apply(c):
        for key, value in values.items():
            node, leaf = dotted(c, key)
            node[leaf] = value

    return apply


def replace_optim_with_a_string_lr(c):
    # A config file may build a section from scratch, around ConfigDict's type checks.
    optim = c.optim.to_dict()
    optim["lr"] = "0.0005"
    c.optim = ml_collections.ConfigDict(optim)


def add_misspelt_key(c):
    c.optim.lrr = 0.001


def drop_key(c):
    del c.train["keep_checkpoints"]


# a ResNet with the tiny config's stochastic depth (0.1), which a ResNet refuses
RESNET_VALUES = {**TINY_RESNET, "model.drop_path_rate": 0.1}
RESNET = set_values(**RESNET_VALUES)
SCHEDULE = "the schedule cannot be longer than training"
CASES = {
    # name: (change, part of the message)
    "patch size zero": (set_values(**{"model.patch_size": 0}), "model.patch_size=0: must be a"),
    "bool for a size": (
        set_values(**{"model.patch_size": True}),
        "model.patch_size=True: must be of type int, not bool",
    ),
    "crop not divisible by patch": (
        set_values(**{"aug.global_size": 18}),
        "aug.global_size=18 is not a multiple of model.patch_size=4",
    ),
    "local crop not divisible": (set_values(**{"aug.local_size": 6}), "aug.local_size=6 is not"),
    "batch not divisible by devices": (
        set_values(**{"optim.batch_size": 12}),
        "optim.batch_size=12 is not divisible by the 8 devices: use a multiple of 8",
    ),
    "negative batch": (set_values(**{"optim.batch_size": -16}), "optim.batch_size=-16: must be"),
    "zero epochs": (set_values(**{"optim.epochs": 0}), "optim.epochs=0: must be a positive int"),
    "teacher temperature zero": (
        set_values(**{"dino.teacher_temp": 0.0}),
        "dino.teacher_temp=0.0: a temperature in (0, 1] is needed",
    ),
    "student temperature above 1": (set_values(**{"dino.student_temp": 2.0}), "(0, 1]"),
    "teacher momentum above 1": (
        set_values(**{"dino.momentum_teacher": 1.5}),
        "dino.momentum_teacher=1.5: use [0, 1] (official 0.996)",
    ),
    "center momentum 1": (set_values(**{"dino.center_momentum": 1.0}), "use [0, 1)"),
    "lr warm-up longer than training": (set_values(**{"optim.warmup_epochs": 5}), SCHEDULE),
    "temperature warm-up longer than training": (
        set_values(**{"dino.warmup_teacher_temp_epochs": 3}),
        SCHEDULE,
    ),
    "last layer frozen longer than training": (
        set_values(**{"optim.freeze_last_layer": 3}),
        SCHEDULE,
    ),
    "lr zero": (set_values(**{"optim.lr": 0.0}), "optim.lr=0.0: must be > 0"),
    "lr infinite": (set_values(**{"optim.lr": float("inf")}), "optim.lr=inf: must be finite"),
    "lr nan": (set_values(**{"optim.lr": float("nan")}), "optim.lr=nan: must be finite"),
    "min lr above lr": (set_values(**{"optim.min_lr": 1.0}), "optim.min_lr=1.0: use [0, optim.lr]"),
    "negative weight decay": (set_values(**{"optim.weight_decay": -0.1}), "must be >= 0"),
    "negative clipping": (set_values(**{"optim.clip_grad": -1.0}), "0 disables clipping"),
    "unknown architecture": (set_values(**{"model.arch": "vit_huge"}), "use one of"),
    "heads do not divide width": (
        set_values(**{"model.num_heads": 3}),
        "model.embed_dim=16 is not divisible by num_heads=3",
    ),
    "drop path 1": (set_values(**{"model.drop_path_rate": 1.0}), "use [0, 1)"),
    "unknown dtype": (set_values(**{"model.compute_dtype": "fp8"}), "use one of"),
    "scale range reversed": (
        set_values(**{"aug.global_scale": (1.0, 0.4)}),
        "aug.global_scale must satisfy 0 < min <= max <= 1",
    ),
    "probability above 1": (set_values(**{"aug.flip_prob": 1.5}), "is a probability"),
    "zero std": (set_values(**{"aug.std": (0.0, 0.2, 0.2)}), "aug.std must be positive"),
    "three global crops": (set_values(**{"aug.n_global": 3}), "exactly 2 global crops"),
    "checkpoint every 0 steps": (set_values(**{"train.checkpoint_every_steps": 0}), "positive"),
    "keep no checkpoint": (set_values(**{"train.keep_checkpoints": 0}), "positive int"),
    "max steps 0": (set_values(**{"train.max_steps": 0}), "train.max_steps=0: must be"),
    "negative skip count": (
        set_values(**{"train.skip_nonfinite_steps": -1}),
        "train.skip_nonfinite_steps must be >= 0",
    ),
    "eval crop above resize": (set_values(**{"eval.crop": 32}), "is larger than eval.resize"),
    "eval batch not divisible": (
        set_values(**{"eval.batch_size": 12}),
        "eval.batch_size=12 is not divisible by the 8 devices",
    ),
    "unknown data source": (set_values(**{"data.source": "s3"}), "use tfds, folder, demo or"),
    "folder without a path": (
        set_values(**{"data.source": "folder", "data.data_dir": ""}),
        "data.data_dir is empty: give the image folder",
    ),
    "folder that is not there": (
        set_values(**{"data.source": "folder", "data.data_dir": NEVER_THERE}),
        f"data.data_dir='{NEVER_THERE}' is not a directory",
    ),
    "init_from that is not there": (
        set_values(**{"init_from": NEVER_THERE + ".pth"}),
        "is not a file: give an official checkpoint.pth",
    ),
    "negative data seed": (set_values(**{"data.seed": -1}), "data.seed=-1: a seed is an int in"),
    "seed 2**64": (set_values(**{"seed": 2**64}), "seed=18446744073709551616: a seed is an int"),
    "seed 2**32 (jax would run seed 0)": (set_values(**{"seed": 2**32}), "keeps 32 bits"),
    "data seed 2**64": (set_values(**{"data.seed": 2**64}), "data.seed=18446744073709551616"),
    "linear probe seed 2**63": (set_values(**{"linear.seed": 2**63}), "linear.seed=922337"),
    "empty k-NN ks": (set_values(**{"eval.knn_ks": ()}), "eval.knn_ks=(): one or more"),
    "k-NN temperature that overflows": (
        set_values(**{"eval.knn_temperature": 0.005}),
        "overflow float32",
    ),
    "local crops larger than global crops": (
        set_values(**{"aug.local_size": 20}),
        "aug.local_size=20 is larger than aug.global_size=16",
    ),
    "test split without a bank split": (
        set_values(**{"data.eval_test_split": "test"}),
        "data.eval_train_split is empty but data.eval_test_split='test' is set",
    ),
    "cudnn attention on CPU": (
        set_values(**{"model.attention": "cudnn", "model.compute_dtype": "bfloat16"}),
        "model.attention='cudnn' needs an NVIDIA GPU (this run is on cpu)",
    ),
    "cudnn attention in float32": (
        set_values(**{"model.attention": "cudnn"}),
        "needs model.compute_dtype bfloat16, not 'float32'",
    ),
    "depth with a named architecture": (
        set_values(**{"model.arch": "vit_small", "model.embed_dim": None, "model.num_heads": None}),
        "model.depth=1 is only read with model.arch='custom' (vit_small has depth 12)",
    ),
    "misspelt architecture": (
        set_values(**{"model.arch": "resnet5"}),
        "model.arch='resnet5' is not an architecture (did you mean resnet50?)",
    ),
    "a ResNet option on a ViT": (
        set_values(**{"model.resnet_widths": (8, 16, 32, 64)}),
        "model.resnet_widths=(8, 16, 32, 64) is only read with model.arch=resnet",
    ),
    "transformer sizes on a ResNet": (
        set_values(**{"model.arch": "resnet50", "model.drop_path_rate": 0.0}),
        "model.embed_dim=16 is a transformer setting; a ResNet reads",
    ),
    "stochastic depth on a ResNet": (
        RESNET,
        "torchvision's ResNet has no stochastic depth",
    ),
    "ResNet sizes missing": (
        set_values(**{**RESNET_VALUES, "model.resnet_depths": None}),
        "model.resnet_depths=None: four positive ints are needed with arch='resnet'",
    ),
    "ResNet sizes with resnet50": (
        set_values(**{**RESNET_VALUES, "model.arch": "resnet50", "model.drop_path_rate": 0.0}),
        "model.resnet_stem_width=4 is only read with model.arch='resnet'",
    ),
    "XCiT name with another patch size": (
        set_values(
            **{
                "model.arch": "xcit_small_12_p8",
                "model.embed_dim": None,
                "model.depth": None,
                "model.num_heads": None,
            }
        ),
        "model.patch_size=4 but xcit_small_12_p8 has patch size 8",
    ),
    "XCiT patch size without a patch embedding": (
        set_values(**{"model.arch": "xcit"}),
        "XCiT's convolutional patch embedding exists for patch sizes 8 and 16 only",
    ),
    "attention maps of a ResNet": (
        set_values(**{**RESNET_VALUES, "model.drop_path_rate": 0.0, "eval.attention_images": 2}),
        "attention maps are DINO's ViT's (its last block's CLS self-attention);"
        " model.arch='resnet' gives none",
    ),
    "registers on a ViT that has none": (
        set_values(**{"model.num_register_tokens": 4}),
        "model.num_register_tokens=4 is a DINOv2 ViT option; the ViT model.arch='custom' has",
    ),
    "SwiGLU on a ResNet": (
        set_values(**{**RESNET_VALUES, "model.drop_path_rate": 0.0, "model.ffn": "swiglufused"}),
        "model.ffn='swiglufused' is a DINOv2 ViT option; the ResNet model.arch='resnet'",
    ),
    "DINOv2 name with another patch size": (
        set_values(
            **{
                "model.arch": "dinov2_vits14",
                "model.embed_dim": None,
                "model.depth": None,
                "model.num_heads": None,
            }
        ),
        "model.patch_size=4 but dinov2_vits14 has patch size 14",
    ),
    "negative register count": (
        set_values(**{"model.arch": "dinov2", "model.num_register_tokens": -1}),
        "model.num_register_tokens=-1: an int >= 0",
    ),
    "unknown feed-forward": (
        set_values(**{"model.arch": "dinov2", "model.ffn": "swiglu2"}),
        "model.ffn='swiglu2': use one of mlp, swiglufused",
    ),
    "unknown centering": (
        set_values(**{"dino.centering": "sinkhorn_knopp"}),
        "dino.centering='sinkhorn_knopp': use one of ema, sinkhorn",
    ),
    "KoLeo chunks that do not split the batch": (
        set_values(**{"dino.koleo_weight": 0.1, "dino.koleo_chunks": 3}),
        "dino.koleo_chunks=3 does not split optim.batch_size=16 into equal chunks",
    ),
    "negative KoLeo weight": (
        set_values(**{"dino.koleo_weight": -0.1}),
        "dino.koleo_weight=-0.1: a weight >= 0",
    ),
    "iBOT on a ResNet (no patch tokens)": (
        set_values(**{"model.arch": "resnet50", "dino.ibot_weight": 1.0}),
        "iBOT predicts masked patch tokens, and resnet50 has no patch tokens",
    ),
    "iBOT on DINO's ViT (no mask token)": (
        set_values(**{"dino.ibot_weight": 1.0}),
        "iBOT replaces masked patches by a learned mask token, and custom has none",
    ),
    "iBOT with a BatchNorm head": (
        set_values(
            **{"model.arch": "dinov2", "dino.ibot_weight": 1.0, "model.use_bn_in_head": True}
        ),
        "dino.ibot_weight > 0 with model.use_bn_in_head=True",
    ),
    "iBOT mask chunks that do not split the batch": (
        set_values(**{"model.arch": "dinov2", "dino.ibot_weight": 1.0, "dino.ibot_chunks": 3}),
        "dino.ibot_chunks=3 does not split optim.batch_size=16 into equal chunks",
    ),
    "iBOT masks that mask nothing": (
        set_values(
            **{"model.arch": "dinov2", "dino.ibot_weight": 1.0, "dino.ibot_mask_probability": 0.0}
        ),
        "dino.ibot_mask_probability=0.0 masks no crop of a chunk of 16 images",
    ),
    "iBOT mask ratio out of order": (
        set_values(**{"dino.ibot_mask_ratio": (0.5, 0.1)}),
        "dino.ibot_mask_ratio=(0.5, 0.1): a (low, high) pair with 0 <= low <= high <= 1",
    ),
    "iBOT prototypes without a separate head": (
        set_values(**{"model.arch": "dinov2", "dino.ibot_weight": 1.0, "dino.ibot_out_dim": 32}),
        "dino.ibot_out_dim=32 sizes a separate patch head, but dino.ibot_separate_head is False",
    ),
    "Gram anchoring on a ResNet": (
        set_values(**{"model.arch": "resnet50", "dino.gram_weight": 1.0}),
        "Gram anchoring compares patch-token similarities, and resnet50 has no patch tokens",
    ),
    "Gram on masked tokens without iBOT": (
        set_values(**{"dino.gram_weight": 1.0, "dino.gram_tokens": "masked"}),
        "dino.gram_tokens='masked' selects patches by the iBOT masks, but iBOT is off",
    ),
    "image-level Gram on masked tokens": (
        set_values(
            **{
                "model.arch": "dinov2",
                "dino.ibot_weight": 1.0,
                "dino.gram_weight": 1.0,
                "dino.gram_tokens": "masked",
                "dino.gram_img_level": True,
            }
        ),
        "dino.gram_tokens='masked' with dino.gram_img_level=True",
    ),
    "Gram chunks that do not split the batch": (
        set_values(**{"dino.gram_weight": 1.0, "dino.gram_chunks": 5}),
        "dino.gram_chunks=5 does not split optim.batch_size=16 into equal chunks",
    ),
    "unknown Gram token selection": (
        set_values(**{"dino.gram_tokens": "patches"}),
        "dino.gram_tokens='patches': use one of all, masked, unmasked",
    ),
    "both Gram negative clamps": (
        set_values(**{"dino.gram_remove_neg": True, "dino.gram_remove_only_teacher_neg": True}),
        "dino.gram_remove_neg and dino.gram_remove_only_teacher_neg exclude each other",
    ),
    "negative Gram start step": (
        set_values(**{"dino.gram_start_step": -1}),
        "dino.gram_start_step=-1: a step count, an int >= 0",
    ),
    "LARS with a zero learning rate": (
        set_values(**{"optim.optimizer": "lars", "optim.lr": 0.0}),
        "optim.lr=0.0: must be > 0",
    ),
    "SGD with a negative learning rate": (
        set_values(**{"optim.optimizer": "sgd", "optim.lr": -0.03, "optim.min_lr": 0.0}),
        "optim.lr=-0.03: must be > 0",
    ),
    "unknown optimizer": (
        set_values(**{"optim.optimizer": "adam"}),
        "optim.optimizer='adam': use one of adamw, sgd, lars",
    ),
    "float16 compute": (
        set_values(**{"model.compute_dtype": "float16"}),
        "model.compute_dtype='float16' is refused: float16 needs dynamic loss scaling",
    ),
    "float16 parameters": (
        set_values(**{"model.param_dtype": "float16"}),
        "model.param_dtype='float16' is refused",
    ),
    "negative shuffle buffer": (set_values(**{"data.shuffle_buffer": -1}), "data.shuffle_buffer"),
    "negative prefetch": (set_values(**{"data.prefetch": -1}), "data.prefetch=-1: must be >= 0"),
    "string for a float in a config file": (
        replace_optim_with_a_string_lr,
        "optim.lr='0.0005': must be of type float, not str",
    ),
    "unknown key in a config file": (
        add_misspelt_key,
        "optim.lrr: unknown key (did you mean optim.lr?)",
    ),
    "missing key in a config file": (drop_key, "train.keep_checkpoints: missing"),
    "RoPE on a ViT that has none": (
        set_values(**{"model.rope_rescale_coords": 2.0}),
        "model.rope_rescale_coords=2.0 is a DINOv3 ViT option (its rotary position embedding)",
    ),
    "DINOv3 name with another patch size": (
        set_values(
            **{
                "model.arch": "dinov3_vits16",
                "model.embed_dim": None,
                "model.depth": None,
                "model.num_heads": None,
            }
        ),
        "model.patch_size=4 but dinov3_vits16 has patch size 16",
    ),
    "RoPE head dimension not a multiple of 4": (
        set_values(**{"model.arch": "dinov3", "model.embed_dim": 12}),
        "= 6 per head: DINOv3's RoPE rotates each head's features in groups of 4",
    ),
    "one RoPE period without the other": (
        set_values(**{"model.arch": "dinov3", "model.rope_min_period": 0.5}),
        "model.rope_min_period=0.5, model.rope_max_period=None: the log-spaced RoPE periods",
    ),
    "DINOv2's resize on DINOv3's ViT": (
        set_values(**{"model.arch": "dinov3", "model.interpolate_antialias": True}),
        "has no position embedding to resize (RoPE takes any patch grid)",
    ),
}


def refused_before_any_compute(config, workdir, caplog, errors=ConfigError):
    """train(config) raises one of `errors` (returned) without creating `workdir` or
    compiling anything."""
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(), pytest.raises(errors) as err:
        train(config, str(workdir))
    assert not workdir.exists()
    assert not [r for r in caplog.records if r.getMessage().startswith("Compiling")]
    return err.value


@pytest.mark.parametrize("name", list(CASES))
def test_invalid_setting_is_refused_before_any_compute(name, tmp_path, tally, caplog):
    if "on CPU" in name and jax.default_backend() != "cpu":
        pytest.skip("a CPU-only setting")
    change, message = CASES[name]
    config = tiny_config(**{"train.max_steps": 1})  # without the check, fails in one step
    change(config)
    with tally.bad_input():
        assert message in str(refused_before_any_compute(config, tmp_path / "run", caplog))


def with_evaluation(**values):
    """k-NN evaluation on the demo test split (2,000 images) as bank and queries."""
    split = {"data.eval_train_split": "test", "data.eval_test_split": "test"}
    return set_values(**{**split, **values})


SIZE_CASES = {
    # name: (change, part of the message); each needs the data listed to be found
    "k above a capped bank": (
        with_evaluation(**{"eval.knn_max_train": 100}),
        "eval.knn_ks=(10, 20, 100, 200): k = 200 exceeds the k-NN bank of 100 images"
        " (data.eval_train_split='test', eval.knn_max_train=100): use"
        " --config.eval.knn_ks=10,20,100",
    ),
    "default k = 200 with a bank of 150 images": (
        with_evaluation(**{"data.source": "synthetic", "data.synthetic_examples": 150}),
        "k = 200 exceeds the k-NN bank of 150 images",
    ),
    "every k above the bank": (
        with_evaluation(**{"eval.knn_max_train": 5, "eval.knn_ks": (10, 20)}),
        "k = 10, 20 exceed the k-NN bank of 5 images (data.eval_train_split='test',"
        " eval.knn_max_train=5): use --config.eval.knn_ks=5",
    ),
    "a dataset smaller than one batch": (
        set_values(**{"data.source": "synthetic", "data.synthetic_examples": 8}),
        "has 8 examples, fewer than one global batch of 16",
    ),
    "a data split that is not there": (
        with_evaluation(**{"data.eval_test_split": "validation"}),
        "validation",
    ),
}


@pytest.mark.parametrize("name", list(SIZE_CASES))
def test_setting_that_does_not_fit_the_data_is_refused_before_the_work_directory(
    name, tmp_path, tally, caplog
):
    change, message = SIZE_CASES[name]
    config = tiny_config(**{"train.max_steps": 1})
    change(config)
    with tally.bad_input():
        err = refused_before_any_compute(config, tmp_path / "run", caplog, (ConfigError, DataError))
        assert message in str(err)


def test_k_nn_on_a_folder_without_labels_is_refused_before_the_work_directory(
    tmp_path, tally, caplog
):
    images = tmp_path / "images" / "train"
    images.mkdir(parents=True)
    for i in range(16):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(images / f"{i}.png")
    # bank, queries and training all read one flat folder: no split is opened twice
    folder = {
        "data.source": "folder",
        "data.data_dir": str(tmp_path / "images"),
        "data.split": "train",
    }
    config = tiny_config(**folder, **{"train.max_steps": 1, "eval.knn_ks": (5,)})
    with_evaluation(**{"data.eval_train_split": "train", "data.eval_test_split": "train"})(config)
    with tally.bad_input():
        err = refused_before_any_compute(config, tmp_path / "run", caplog, DataError)
        assert "k-NN evaluation needs labelled images" in str(err)


def test_legitimate_but_suspicious_settings_are_warned_about(tmp_path, caplog):
    config = tiny_config(**{"train.max_steps": 2, "train.checkpoint_every_steps": 1000})
    with_evaluation(**{"eval.knn_every_epochs": 2, "eval.attention_images": 5000})(config)
    config.data.canvas_size, config.eval.resize, config.eval.crop = 12, 24, 24
    caplog.set_level(logging.WARNING)
    preflight(config, str(tmp_path / "run"), parallel.make_mesh())
    warned = caplog.text
    assert "train.checkpoint_every_steps=1000 is more than the 2 steps this run trains" in warned
    assert "eval.knn_every_epochs=2 is not less than optim.epochs=2" in warned
    assert "eval.attention_images=5000: the test split has only 2000 images" in warned
    # a canvas smaller than the crops: right for images that small only
    assert "data.canvas_size=12 is smaller than aug.global_size=16" in warned
    assert "data.canvas_size=12 is smaller than eval.crop=24" in warned
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--config.optim.lrr=1"],
            "--config.optim.lrr=1: config.optim.lrr is not a setting;"
            " did you mean --config.optim.lr?",
        ),
        (["--config.optim.lr=abc"], "--config.optim.lr=abc: 'abc' is not a number"),
        (["--config.optim.batch_size=12"], "not divisible by the 8 devices: use a multiple of 8"),
    ],
    ids=["unknown key", "wrong type", "invalid value"],
)
def test_train_py_refuses_bad_overrides_with_a_message(tmp_path, tally, args, message):
    with tally.bad_input():
        result = train_py(tmp_path / "run", *args)
        assert result.returncode != 0
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "run").exists()

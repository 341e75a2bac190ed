"""Every configuration key the code reads, with the official defaults; recipe files, dotted
keys and the flat form stored with checkpoints.

Recipes in `configs/` start from `default_config()` and override; dino_jax.validation refuses
a bad config with every problem listed before anything is compiled or read.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Iterable
from typing import Any

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
    """A configuration value that cannot work; the message lists what to change."""


def load_recipe(path: str | os.PathLike[str]) -> ml_collections.ConfigDict:
    """`get_config()` of a recipe file such as configs/vit_small16.py."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist: give one such as configs/demo.py")
    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception as err:  # the recipe's own code failed: say where, not a traceback
        raise ConfigError(
            f"config file {path} could not be loaded ({type(err).__name__}: {err}); a recipe"
            " defines get_config() returning dino_jax.config.default_config() with changes"
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"config file {path}: get_config() returned {type(config).__name__}, not a ConfigDict"
        )
    return config


def dotted(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """(section, name) of a dotted key such as "optim.lr"; KeyError if a section is missing."""
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    return node, leaf


def default_config() -> ml_collections.ConfigDict:
    """The official ViT-S/16 recipe (main_dino.py defaults, 10 local crops) on ImageNet."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # An official checkpoint.pth / *_pretrain.pth to initialise the student and teacher from.
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    # ViT: vit_tiny | vit_small | vit_base | vit_large | custom (sizes below);
    # DINOv2 ViT: dinov2_vits14 | ... | dinov2 (options below);
    # ResNet: resnet50 | resnet (sizes below); XCiT: any of xcit.py's models, e.g. the released
    # xcit_small_12_p16 | xcit_small_12_p8 | xcit_medium_24_p16 | xcit_medium_24_p8, or xcit
    # (sizes below). See dino_jax.models.backbones.
    c.model.arch = "vit_small"
    c.model.embed_dim = config_dict.placeholder(int)  # only for arch = custom | xcit | dinov2
    c.model.depth = config_dict.placeholder(int)
    c.model.num_heads = config_dict.placeholder(int)
    c.model.patch_size = 16  # ViT and XCiT (an XCiT name fixes it: xcit_*_p8 needs 8)
    c.model.resnet_stem_width = config_dict.placeholder(int)  # only for arch = resnet
    c.model.resnet_widths = config_dict.placeholder(tuple)  # bottleneck width of each stage
    c.model.resnet_depths = config_dict.placeholder(tuple)  # blocks per stage
    # DINOv2's ViT (arch = dinov2_vits14 | dinov2_vitb14 | dinov2_vitl14 | dinov2_vitg14 |
    # dinov2 with the sizes above); these options are its alone
    c.model.num_register_tokens = 0  # register tokens after the CLS token
    c.model.layerscale_init = 0.0  # LayerScale's initial gain; 0: no LayerScale
    c.model.ffn = "mlp"  # mlp | swiglufused
    c.model.interpolate_offset = 0.1  # position-embedding resize: scale (n + offset) / grid
    c.model.interpolate_antialias = False  # the antialiased bicubic resize
    # DINOv3's ViT (arch = dinov3_vits16 | dinov3_vitb16 | dinov3_vitl16 | dinov3 with the
    # sizes above): RoPE in every block instead of a learned position embedding. Its storage
    # tokens, LayerScale and feed-forward are the three settings above (ffn: mlp | swiglu |
    # swiglu32 | swiglu64 | swiglu128); the RoPE settings are its alone
    c.model.rope_base = 100.0  # periods base ** (4i / head_dim); or min/max periods below
    c.model.rope_min_period = config_dict.placeholder(float)
    c.model.rope_max_period = config_dict.placeholder(float)
    c.model.rope_normalize_coords = "separate"  # separate | max | min
    c.model.rope_shift_coords = config_dict.placeholder(float)  # training augmentations
    c.model.rope_jitter_coords = config_dict.placeholder(float)
    c.model.rope_rescale_coords = config_dict.placeholder(float)
    c.model.rope_dtype = "fp32"  # fp32 | bf16: the arithmetic of sin / cos and the rotation
    c.model.drop_path_rate = 0.1
    c.model.out_dim = 65536
    c.model.norm_last_layer = True
    c.model.use_bn_in_head = False
    c.model.head_nlayers = 3
    c.model.head_hidden_dim = 2048
    c.model.head_bottleneck_dim = 256
    # bf16 compute with float32 params; logits, loss, center and EMA stay float32. The
    # official code used fp16 autocast; "float32" reproduces its fp32 runs.
    c.model.compute_dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.attention = "auto"  # auto (= xla) | xla | cudnn (see recipe.attention_implementation)
    # ViTs' token sequences padded to a multiple of this for fused attention kernels, the
    # padding masked out (0: no padding); the result equals the unpadded attention
    c.model.attention_pad = 0
    c.model.gelu = "exact"  # exact (the official nn.GELU) | tanh (faster on GPUs: a speed option)
    # activation checkpointing of the blocks, for larger per-device batches: none | block (the
    # whole block recomputed in the backward pass) | dots (matmul outputs kept, the rest redone)
    c.model.remat = "none"

    c.dino = ml_collections.ConfigDict()
    c.dino.student_temp = 0.1
    c.dino.teacher_temp = 0.04
    c.dino.warmup_teacher_temp = 0.04
    c.dino.warmup_teacher_temp_epochs = 0
    c.dino.momentum_teacher = 0.996
    c.dino.center_momentum = 0.9
    # ema: DINO's softmax around an EMA center; sinkhorn: DINOv2's Sinkhorn-Knopp (3 iterations)
    c.dino.centering = "ema"
    c.dino.koleo_weight = 0.0  # DINOv2's KoLeo regulariser on the student's global features
    # KoLeo's neighbours: 1 = over the global batch; N = within N equal chunks of it (the
    # official per-GPU computation: N = the official run's GPU count)
    c.dino.koleo_chunks = 1
    # iBOT's masked-patch loss (DINOv2: weight 1.0): block masks on the student's global crops,
    # the teacher's patch tokens as targets, centred as dino.centering says
    c.dino.ibot_weight = 0.0
    c.dino.ibot_mask_ratio = (0.1, 0.5)  # masked fraction of a masked crop: spread over this
    c.dino.ibot_mask_probability = 0.5  # fraction of global crops that get a mask
    c.dino.ibot_separate_head = False  # a head of its own for patches (else the DINO head's)
    c.dino.ibot_out_dim = 0  # its prototypes with a separate head; 0: model.out_dim
    # masks are drawn per chunk of the global batch, N equal chunks (the official draws them
    # per GPU: N = the official run's GPU count; a multiple of the devices keeps gathers local)
    c.dino.ibot_chunks = 1
    # DINOv3's Gram anchoring: the student's patch similarities pulled to those of a frozen
    # copy of the EMA teacher, taken at gram_start_step and again every gram_update_every
    c.dino.gram_weight = 0.0
    c.dino.gram_start_step = 0
    c.dino.gram_update_every = 0  # 0: never refreshed after the first copy
    c.dino.gram_img_level = False  # one Gram per image; else one per chunk of the batch
    c.dino.gram_tokens = "all"  # all | masked | unmasked (the iBOT masks' patches)
    c.dino.gram_remove_neg = False
    c.dino.gram_remove_only_teacher_neg = False
    c.dino.gram_chunks = 1  # batch-level Grams over N equal chunks (official: per GPU)
    # > 0: the student's last layer and DINO's cross-entropy made over N chunks of each
    # device's batch, the logits of a chunk made again in the backward pass: the (crops, B, K)
    # float32 logits are never held at once, for one more last-layer matmul (same values;
    # docs/performance.md). 0: the logits of the whole batch at once
    c.dino.loss_chunks = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adamw"  # adamw | sgd | lars (main_dino.py --optimizer)
    c.optim.batch_size = 1024  # global, over all devices and hosts
    c.optim.epochs = 100
    c.optim.lr = 0.0005  # per 256 images: peak lr = lr * batch_size / 256
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 10
    c.optim.weight_decay = 0.04
    c.optim.weight_decay_end = 0.4
    c.optim.clip_grad = 3.0
    c.optim.freeze_last_layer = 1
    # updates that may not apply at a step (the frozen last layer; with
    # train.skip_nonfinite_steps, the whole update) under lax.cond instead of computed and
    # selected: no copies of the donated state, a conditional in the step (docs/performance.md)
    c.optim.branch_updates = False
    # every update made to wait for the whole gradient (its global norm), so that XLA can
    # overwrite the donated weights in place instead of copying them (docs/performance.md)
    c.optim.wait_for_gradient = False
    # the student, the teacher and the moments held as one flat vector per update group
    # while the run steps: the update and the EMA as a few large kernels (AdamW and SGD;
    # checkpoints stay per tensor; dino_jax.optim_flat, docs/performance.md)
    c.optim.flat_state = False

    c.aug = ml_collections.ConfigDict()  # see dino_jax.data.augment.MultiCropConfig
    c.aug.global_size = 224
    c.aug.local_size = 96
    c.aug.n_global = 2
    c.aug.n_local = 10  # local_crops_number: the code default is 8, the best paper run 10
    c.aug.global_scale = (0.4, 1.0)
    c.aug.local_scale = (0.05, 0.4)
    c.aug.ratio = (3 / 4, 4 / 3)
    c.aug.flip_prob = 0.5
    c.aug.jitter_prob = 0.8
    c.aug.brightness = 0.4
    c.aug.contrast = 0.4
    c.aug.saturation = 0.2
    c.aug.hue = 0.1
    c.aug.grayscale_prob = 0.2
    c.aug.global_blur_prob = (1.0, 0.1)  # one per global crop
    c.aug.global_solarize_prob = (0.0, 0.2)
    c.aug.local_blur_prob = 0.5
    c.aug.blur_radius = (0.1, 2.0)
    c.aug.mean = (0.485, 0.456, 0.406)
    c.aug.std = (0.229, 0.224, 0.225)
    # resample each crop from a window of the canvas that covers its box instead of the whole
    # canvas: the same crops, less work
    c.aug.window = False

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # tfds | folder | demo | synthetic
    c.data.tfds_name = "imagenet2012"
    c.data.split = "train"
    c.data.eval_train_split = "train"  # the k-NN bank
    c.data.eval_test_split = "validation"  # classified by k-NN
    c.data.data_dir = ""  # TFDS data_dir, an image folder, or a directory of IDX files
    c.data.manual_dir = ""  # where the ImageNet archives were downloaded by hand
    c.data.canvas_size = 512  # host output: images fit an L x L canvas, cropped on device
    c.data.seed = 0  # data order: epoch e of process p is a permutation seeded by (seed, e, p)
    c.data.shuffle_buffer = 10_000  # TFRecord-backed TFDS datasets only
    c.data.num_parallel_calls = -1  # decode threads; <= 0 lets tf.data tune it
    c.data.prefetch = 2  # global batches in flight to the devices
    c.data.synthetic_examples = 10_000
    c.data.synthetic_classes = 10

    c.train = ml_collections.ConfigDict()
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 1000
    c.train.keep_checkpoints = 3
    c.train.max_steps = config_dict.placeholder(int)  # stop early (tests, smoke runs)
    c.train.skip_nonfinite_steps = 0  # > 0: tolerate that many non-finite losses in a row
    c.train.allow_config_change = False  # resume although the recipe changed (lr, epochs)
    c.train.fsdp = False  # shard params and optimiser state over devices (large models)
    c.train.progress_bar = True
    # compiled steps queued ahead of the host (metrics are fetched for the logged steps once
    # they have run; non-finite steps are counted on the device)
    c.train.steps_in_flight = 2
    # XLA's persistent compilation cache, so a resumed or restarted run loads its compiled
    # step: "auto" ($DINO_JAX_CACHE or ~/.cache/dino_jax, under xla/), a folder, or "" (off)
    c.train.compilation_cache = "auto"

    c.eval = ml_collections.ConfigDict()
    c.eval.knn_every_epochs = 0  # 0: only at the end of training
    c.eval.knn_ks = (10, 20, 100, 200)
    c.eval.knn_temperature = 0.07
    c.eval.knn_max_train = 0  # 0: the whole split
    c.eval.resize = 256  # eval transform: resize shorter side, then center crop
    c.eval.crop = 224
    c.eval.batch_size = 256
    c.eval.attention_images = 0  # attention-map PNGs written at the end of training
    # At the end, also k-NN of the same network at its random init and of raw pixels.
    c.eval.report_baselines = False

    # The linear probe of a frozen backbone (eval_linear.py defaults): `dino-jax-evaluate linear`.
    c.linear = ml_collections.ConfigDict()
    c.linear.epochs = 100
    c.linear.lr = 0.001  # per 256 images: lr = lr * batch_size / 256
    c.linear.batch_size = 1024  # global (official: 128 per GPU on 8 GPUs)
    c.linear.momentum = 0.9  # SGD, no weight decay
    c.linear.n_last_blocks = 4  # ViT-S: 4; ViT-B: 1 with avgpool
    c.linear.avgpool = False  # append the mean patch token of the last block
    c.linear.crop_scale = (0.08, 1.0)  # RandomResizedCrop's default area range
    c.linear.val_every_epochs = 1
    c.linear.steps_per_epoch = 0  # 0: one pass over the training split; > 0 caps it (smoke runs)
    c.linear.num_classes = 0  # 0: largest validation label + 1
    c.linear.seed = 0
    return c


def leaves(node, prefix: str = "") -> dict:
    """{"section.key": value} of a (nested) config, values as they are."""
    out = {}
    for key, value in node.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{"section.key": value} with tuples as lists: the JSON form stored with checkpoints."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in leaves(config).items()}


def closest_key(name: str, keys: Iterable[str]) -> str | None:
    """The key most like a misspelt `name`, if any is close."""
    close = difflib.get_close_matches(name, list(keys), n=1)
    return close[0] if close else None

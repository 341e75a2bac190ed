"""DINOv3's ViT as a configured backbone family: its names and sizes, the options it reads and
those it refuses, the RoPE settings (refused on every other family), and init_from files,
which no official DINO checkpoint can fill (its position embedding is learned, DINOv3's is
RoPE): each refusal names the setting and what to do, before anything is built."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.pth_files import official_files
from helpers.tiny import TINY_RESNET, TINY_XCIT, tiny_config

from dino_jax import validation
from dino_jax.checkpoint_resume import CheckpointError
from dino_jax.config import ConfigError
from dino_jax.interop.official import OfficialCheckpointError, load_official
from dino_jax.models import rope
from dino_jax.models.backbones import (
    DINOV3_ARCHS,
    build_backbone,
    family,
    has_attention_maps,
    is_vit,
    size_multiple,
    vit_depth,
)
from dino_jax.models.vit3 import ARCHS, VisionTransformer3
from dino_jax.starting_state import check_init_from
from dino_jax.trainer import train

DINOV3 = {"model.arch": "dinov3"}  # the tiny config's sizes: width 16, 2 heads, patch 4
NAMED = {
    "model.arch": "dinov3_vits16",
    "model.embed_dim": None,
    "model.depth": None,
    "model.num_heads": None,
    "model.patch_size": 16,
    "aug.global_size": 32,
    "aug.local_size": 16,
    "eval.resize": 32,
    "eval.crop": 32,
}


def errors(**changes) -> str:
    """The ConfigError text of the tiny config with `changes`, '' if it validates."""
    try:
        validation.validate(tiny_config(**changes), num_devices=1)
    except ConfigError as err:
        return str(err)
    return ""


def build(**changes) -> VisionTransformer3:
    c = tiny_config(**changes)
    validation.validate(c, num_devices=1)
    return build_backbone(
        c.model, img_size=c.aug.global_size, dtype=jnp.float32, param_dtype=jnp.float32
    )


def test_the_names_are_the_hub_sizes_and_the_options_come_from_the_config():
    assert set(DINOV3_ARCHS) == {"dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"}
    assert all(family(name) == "dinov3" for name in (*DINOV3_ARCHS, "dinov3"))
    for name, official in (("dinov3_vitb16", "vit_base"), ("dinov3_vitl16", "vit_large")):
        m = build(**{**NAMED, "model.arch": name})
        sizes = {k: getattr(m, k) for k in ("embed_dim", "depth", "num_heads", "ffn_ratio")}
        assert sizes == ARCHS[official] and m.patch_size == 16
    options = {
        "model.num_register_tokens": 4,
        "model.layerscale_init": 1e-5,
        "model.ffn": "swiglu64",
        "model.rope_normalize_coords": "max",
        "model.rope_shift_coords": 0.1,
        "model.rope_jitter_coords": 1.5,
        "model.rope_rescale_coords": 2.0,
        "model.rope_dtype": "bf16",
        "model.drop_path_rate": 0.2,
    }
    m = build(**NAMED, **options)
    got = (m.n_storage_tokens, m.layerscale_init, m.ffn_layer, m.rope_normalize_coords)
    assert got == (4, 1e-5, "swiglu64", "max")
    assert (m.rope_shift_coords, m.rope_jitter_coords, m.rope_rescale_coords) == (0.1, 1.5, 2.0)
    assert (m.rope_dtype, m.drop_path_rate, m.embed_dim) == ("bf16", 0.2, 384)
    custom = build(**DINOV3)  # LayerScale 0: none; the default RoPE
    assert (custom.embed_dim, custom.depth, custom.num_heads, custom.patch_size) == (16, 1, 2, 4)
    assert custom.layerscale_init is None and custom.rope_base == 100.0
    assert custom.rope_dtype == "fp32" and custom.ffn_layer == "mlp"


def test_the_helpers_answer_for_the_built_backbone():
    m = build(**DINOV3, **{"model.depth": 3})
    assert is_vit(m) and not has_attention_maps(m)
    assert (size_multiple(m), vit_depth(m)) == (4, 3)
    assert validation.input_multiple(tiny_config(**DINOV3).model) == 4


def test_both_periods_parametrise_the_rope_and_the_default_base_gives_way():
    m = build(**DINOV3, **{"model.rope_min_period": 0.5, "model.rope_max_period": 40.0})
    kwargs = m.rope_kwargs()
    assert (kwargs["base"], kwargs["min_period"], kwargs["max_period"]) == (None, 0.5, 40.0)
    periods = rope.rope_periods(kwargs["head_dim"], base=None, min_period=0.5, max_period=40.0)
    np.testing.assert_allclose(periods, [0.5, 40.0], rtol=1e-6)  # head_dim 8: two periods
    x = jnp.zeros((1, 8, 8, 3))
    assert m.apply(m.init(jax.random.key(0), x), x).cls.shape == (1, 16)


def test_cudnn_attention_is_a_setting_of_dinov3_too():
    cudnn = {**DINOV3, "model.attention": "cudnn", "model.compute_dtype": "bfloat16"}
    validation.validate(tiny_config(**cudnn), num_devices=1, platform="gpu")
    with pytest.raises(ConfigError) as err:
        validation.validate(tiny_config(**cudnn), num_devices=1, platform="cpu")
    assert "needs an NVIDIA GPU" in str(err.value) and "is a ViT setting" not in str(err.value)


R = "model.rope_"
REFUSED = {
    # name: (changes to the tiny config, part of the message)
    "named size with its own sizes": (
        {**NAMED, "model.embed_dim": 16},
        "model.embed_dim=16 is only read with model.arch='dinov3' (dinov3_vits16 has"
        " embed_dim 384): set model.arch=dinov3, or leave model.embed_dim unset",
    ),
    "named size with another patch size": (
        {**NAMED, "model.patch_size": 8},
        "model.patch_size=8 but dinov3_vits16 has patch size 16: set model.patch_size=16",
    ),
    "custom without a width": (
        {**DINOV3, "model.embed_dim": None},
        "model.embed_dim=None: a positive int is needed with arch='dinov3'",
    ),
    "head dimension not a multiple of 4": (
        {**DINOV3, "model.embed_dim": 12},
        "model.embed_dim=12 / model.num_heads=2 = 6 per head: DINOv3's RoPE rotates each"
        " head's features in groups of 4",
    ),
    "ResNet sizes": (
        {**DINOV3, "model.resnet_stem_width": 4},
        "model.resnet_stem_width=4 is only read with model.arch=resnet (this is the DINOv3 ViT",
    ),
    "negative storage tokens": (
        {**DINOV3, "model.num_register_tokens": -1},
        "model.num_register_tokens=-1: an int >= 0 (DINOv3's recipes: 4)",
    ),
    "negative LayerScale": (
        {**DINOV3, "model.layerscale_init": -1.0},
        "model.layerscale_init=-1.0: >= 0 (DINOv3's recipes: 1e-5; 0: off)",
    ),
    "DINOv2's feed-forward name": (
        {**DINOV3, "model.ffn": "swiglufused"},
        "model.ffn='swiglufused': use one of mlp, swiglu, swiglu32, swiglu64, swiglu128"
        " (DINOv3's ffn_layer) (DINOv2's swiglufused is DINOv3's swiglu)",
    ),
    "DINOv3's feed-forward name on DINOv2": (
        {"model.arch": "dinov2", "model.ffn": "swiglu"},
        "model.ffn='swiglu': use one of mlp, swiglufused (DINOv3's swiglu is this swiglufused)",
    ),
    "DINOv2's resize offset": (
        {**DINOV3, "model.interpolate_offset": 0.0},
        "model.interpolate_offset=0.0 sets DINOv2's position-embedding resize; DINOv3's ViT"
        " (model.arch='dinov3') has no position embedding to resize (RoPE takes any patch"
        " grid): leave model.interpolate_offset=0.1",
    ),
    "DINOv2's antialiased resize": (
        {**NAMED, "model.interpolate_antialias": True},
        "model.interpolate_antialias=True sets DINOv2's position-embedding resize; DINOv3's ViT"
        " (model.arch='dinov3_vits16') has no position embedding to resize",
    ),
    "a minimum period alone": (
        {**DINOV3, R + "min_period": 0.5},
        "model.rope_min_period=0.5, model.rope_max_period=None: the log-spaced RoPE periods"
        " need both; set both, or neither (periods from model.rope_base)",
    ),
    "a maximum period alone": (
        {**DINOV3, R + "max_period": 40.0},
        "model.rope_min_period=None, model.rope_max_period=40.0: the log-spaced RoPE periods",
    ),
    "a base and both periods": (
        {**DINOV3, R + "base": 10.0, R + "min_period": 0.5, R + "max_period": 40.0},
        "model.rope_base=10.0 with model.rope_min_period / rope_max_period: two"
        " parametrisations of the RoPE periods",
    ),
    "periods the wrong way round": (
        {**DINOV3, R + "min_period": 40.0, R + "max_period": 0.5},
        "model.rope_min_period=40.0 > model.rope_max_period=0.5: swap them",
    ),
    "a negative period": (
        {**DINOV3, R + "min_period": -1.0, R + "max_period": 0.5},
        "model.rope_min_period=-1.0: must be > 0 (or unset: None)",
    ),
    "a zero base": ({**DINOV3, R + "base": 0.0}, "model.rope_base=0.0: must be > 0"),
    "a negative shift": (
        {**DINOV3, R + "shift_coords": -0.1},
        "model.rope_shift_coords=-0.1: must be > 0 (or unset: None)",
    ),
    "a jitter below 1": (
        {**DINOV3, R + "jitter_coords": 0.5},
        "model.rope_jitter_coords=0.5: a factor >= 1, drawn log-uniformly in [1/x, x]",
    ),
    "a rescale below 1": (
        {**DINOV3, R + "rescale_coords": 0.0},
        "model.rope_rescale_coords=0.0: a factor >= 1",
    ),
    "an unknown coordinate normalisation": (
        {**DINOV3, R + "normalize_coords": "mean"},
        "model.rope_normalize_coords='mean': use one of separate, max, min",
    ),
    "a float16 RoPE": (
        {**DINOV3, R + "dtype": "fp16"},
        "model.rope_dtype='fp16': use one of fp32, bf16 (DINOv3's pos_embed_rope_dtype",
    ),
    "attention maps": (
        {**DINOV3, "eval.attention_images": 2},
        "attention maps are DINO's ViT's (its last block's CLS self-attention);"
        " model.arch='dinov3' gives none: set eval.attention_images=0",
    ),
    "RoPE on DINO's ViT": (
        {R + "rescale_coords": 2.0},
        "model.rope_rescale_coords=2.0 is a DINOv3 ViT option (its rotary position embedding);"
        " the ViT model.arch='custom' has no RoPE: set model.arch=dinov3 (or dinov3_vits16,"
        " ...), or leave model.rope_rescale_coords=None",
    ),
    "RoPE on DINOv2's ViT": (
        {"model.arch": "dinov2", R + "dtype": "bf16"},
        "model.rope_dtype='bf16' is a DINOv3 ViT option (its rotary position embedding); the"
        " DINOv2 ViT model.arch='dinov2' has no RoPE",
    ),
    "RoPE on a ResNet": (
        {**TINY_RESNET, R + "base": 10.0},
        "model.rope_base=10.0 is a DINOv3 ViT option (its rotary position embedding); the"
        " ResNet model.arch='resnet' has no RoPE",
    ),
    "RoPE on an XCiT": (
        {**TINY_XCIT, R + "normalize_coords": "min"},
        "the XCiT model.arch='xcit' has no RoPE",
    ),
    "registers on DINO's ViT": (
        {"model.num_register_tokens": 4},
        "model.num_register_tokens=4 is a DINOv2 ViT option; the ViT model.arch='custom' has"
        " no such thing: set model.arch=dinov2 (or dinov2_vits14, ...; DINOv3's ViT,"
        " model.arch=dinov3, has it too), or leave model.num_register_tokens=0",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_wrong_setting_is_refused_with_what_to_do(name):
    changes, message = REFUSED[name]
    assert message in errors(**changes)


def test_the_defaults_and_the_demo_recipe_validate():
    assert errors(**DINOV3) == errors(**NAMED) == ""
    assert errors(**DINOV3, **{"model.rope_min_period": 0.5, "model.rope_max_period": 40.0}) == ""


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Official-format files: (checkpoint.pth, backbone.pth) of the tiny ViT, and the backbone
    of a tiny ResNet."""
    c, r = tiny_config(), tiny_config(**TINY_RESNET)
    vit = official_files(tmp_path_factory.mktemp("vit"), c.model, c.aug.global_size)
    resnet = official_files(tmp_path_factory.mktemp("resnet"), r.model, r.aug.global_size)
    return {"checkpoint": vit[0], "backbone": vit[1], "resnet": resnet[1]}


POS_EMBED = (
    "it holds a ViT with a learned position embedding (backbone.pos_embed (1, 17, 16)), as every"
    " official DINO ViT does, and model.arch='dinov3' is DINOv3's RoPE ViT, which has no learned"
    " position embedding (a rotary embedding in every block gives its positions), so this file"
    " cannot start it: leave init_from empty to train it from its initialisation, or train the"
    " file's own architecture from it: --config.model.arch=custom"
)


@pytest.mark.parametrize("which", ["checkpoint", "backbone"])
def test_an_official_vit_file_cannot_start_the_rope_vit(official, which, tmp_path, tally, caplog):
    """Refused by the trainer's preflight, before the work directory or any compilation."""
    path = official[which]
    config = tiny_config(**DINOV3, **{"init_from": str(path), "train.max_steps": 1})
    caplog.set_level(logging.WARNING)
    with tally.bad_input(), jax.log_compiles(), pytest.raises(CheckpointError) as err:
        train(config, str(tmp_path / "run"))
    assert str(err.value).startswith(f"init_from: {path}: {POS_EMBED}"), err.value
    assert not (tmp_path / "run").exists()
    assert not [r for r in caplog.records if r.getMessage().startswith("Compiling")]
    # the trainer's load refuses it too, before reading a tensor
    with pytest.raises(OfficialCheckpointError, match="no learned position embedding"):
        load_official(path, config.model, img_size=config.aug.global_size)


def test_the_fix_names_the_file_s_own_sizes(official, tally):
    """A DINOv3 config of other sizes than the file's: the settings that would train it."""
    config = tiny_config(**NAMED, **{"init_from": str(official["backbone"])})
    with tally.bad_input(), pytest.raises(CheckpointError) as err:
        check_init_from(config)
    assert (
        "--config.model.arch=custom --config.model.embed_dim=16 --config.model.depth=1"
        " --config.model.patch_size=4 --config.aug.global_size=16 (with"
        " model.num_register_tokens, layerscale_init, ffn and the rope_* settings at their"
        " defaults)" in str(err.value)
    ), err.value


def test_another_family_s_file_cannot_start_the_rope_vit(official, tally):
    config = tiny_config(**DINOV3, **{"init_from": str(official["resnet"])})
    with tally.bad_input(), pytest.raises(CheckpointError) as err:
        check_init_from(config)
    message = str(err.value)
    assert message.startswith(f"init_from: {official['resnet']}: it holds a ResNet (stem 4,")
    assert "and model.arch='dinov3' is DINOv3's RoPE ViT" in message
    assert "leave init_from empty" in message and "--config.model.arch=resnet" in message

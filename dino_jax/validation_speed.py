"""Validation of the speed options of `config.model` (attention_pad, gelu, remat): their values,
and the backbones that have what they act on; and of optim.flat_state's combinations."""

from __future__ import annotations

from dino_jax.models.vit import GELUS, REMATS
from dino_jax.optim_flat import FLAT_OPTIMIZERS
from dino_jax.validation_base import Errors

SPEED_DEFAULTS = {"attention_pad": 0, "gelu": "exact", "remat": "none"}
# (family, speed option) -> why that family has no use for it
SPEED_REFUSALS = {
    ("resnet", "attention_pad"): "a ResNet has no attention",
    ("resnet", "gelu"): "a ResNet has no GELU (its activations are ReLUs)",
    ("resnet", "remat"): "a ResNet has no transformer blocks to checkpoint",
    ("xcit", "attention_pad"): "XCiT attends over channels (XCA), with no token sequence to pad",
    ("xcit", "remat"): "activation checkpointing is there for the ViTs' blocks, not XCiT's",
}


def speed_option_errors(m, kind: str | None) -> list[str]:
    """model.attention_pad / gelu / remat: their values, and the models that have them (a
    ResNet none of them, XCiT its GELUs only, a SwiGLU feed-forward no GELU). attention_pad
    > 0 is allowed with XLA's attention too, where it only adds work: it is there for fused
    kernels (model.attention=cudnn). `kind`: the backbone family (None if unknown)."""
    e = Errors()
    pad = m.attention_pad
    e.check(
        isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0,
        f"model.attention_pad={pad!r}: an int >= 0, the multiple the ViTs' token sequences are"
        " padded to for fused attention kernels (0: off; e.g. 64 with model.attention=cudnn)",
    )
    e.check(
        m.gelu in GELUS,
        f"model.gelu={m.gelu!r}: use exact (the official nn.GELU) or tanh (its approximation,"
        " a speed option)",
    )
    e.check(
        m.remat in REMATS,
        f"model.remat={m.remat!r}: use one of {', '.join(REMATS)} (activation checkpointing of"
        " each transformer block)",
    )
    for (refusing, key), why in SPEED_REFUSALS.items():
        default = SPEED_DEFAULTS[key]
        e.check(
            kind != refusing or m[key] == default,
            f"model.{key}={m[key]!r} with model.arch={m.arch!r}: {why}; leave"
            f" model.{key}={default!r}",
        )
    if kind in ("dinov2", "dinov3"):
        e.check(
            m.ffn == "mlp" or m.gelu == SPEED_DEFAULTS["gelu"],
            f"model.gelu={m.gelu!r} with model.ffn={m.ffn!r}: the SwiGLU feed-forward has no"
            " GELU (its gate is a SiLU); leave model.gelu='exact', or set model.ffn=mlp",
        )
    return e


def flat_state_errors(c) -> list[str]:
    """optim.flat_state: with AdamW or SGD (LARS scales each tensor by its own trust ratio),
    and with the state replicated (train.fsdp splits each tensor over the devices)."""
    e = Errors()
    if c.optim.flat_state:
        e.check(
            c.optim.optimizer in FLAT_OPTIMIZERS,
            f"optim.flat_state=True with optim.optimizer={c.optim.optimizer!r}: LARS scales each"
            " tensor by its own trust ratio and has no flat form; use adamw or sgd, or set"
            " optim.flat_state=False",
        )
        e.check(
            not c.train.fsdp,
            "optim.flat_state=True with train.fsdp=True: the flat groups are replicated, FSDP"
            " splits each tensor over the devices; set one of them to False",
        )
    return e

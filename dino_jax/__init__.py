"""DINO (self-distillation with no labels) for Vision Transformers in JAX/Flax.

`dino_jax.preprocess` and `dino_jax.features` (dino_jax.inference) are imported on first use,
so that `import dino_jax` stays free of JAX and Flax.
"""

__version__ = "0.1.0"

_LAZY = ("features", "preprocess")
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        from dino_jax import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'dino_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

"""DINO (self-distillation with no labels) for Vision Transformers in JAX/Flax."""

__version__ = "0.1.0"

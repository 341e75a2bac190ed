"""ViT backbone, DINO head and the multi-crop network."""

from dino_jax.models.head import DINOHead
from dino_jax.models.multicrop import MultiCropNetwork
from dino_jax.models.vit import ARCHS, VisionTransformer, ViTOutput, build_vit

__all__ = ["ARCHS", "DINOHead", "MultiCropNetwork", "ViTOutput", "VisionTransformer", "build_vit"]

"""ResNet backbone as DINO trains it (`--arch resnet50`): torchvision's ResNet v1.5, no `fc`.

Parameter and batch-stats names mirror torchvision's state-dict names (`layer1_0/conv1` for
`layer1.0.conv1`, `layer1_0/downsample_0` for `layer1.0.downsample.0`), so the released
`dino_resnet50_pretrain.pth` maps onto these variables one to one.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from dino_jax.models.batchnorm import BatchNorm

Dtype = Any

EXPANSION = 4  # torchvision's Bottleneck.expansion: a block outputs 4 * planes channels

# torchvision's init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated
# normal of variance 2 / (out_channels * kh * kw); Flax's kaiming_normal is fan_in, truncated.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@struct.dataclass
class ResNetOutput:
    feature: jax.Array  # (B, 4 * widths[-1]): globally average-pooled layer4, the DINO feature
    stages: tuple[jax.Array, ...]  # NHWC stem, layer1..layer4 outputs, when requested


class _ConvBN(nn.Module):
    """Common dtype/init plumbing for the convs (no bias anywhere) and BatchNorms."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, features: int, kernel: int, stride: int, name: str) -> nn.Conv:
        # PyTorch's explicit symmetric padding (k // 2), not "SAME": for stride 2 on an even
        # size XLA's SAME pads more at the end than at the start and shifts every output.
        pad = kernel // 2
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=kaiming_normal_fan_out,
            name=name,
        )

    def bn(self, name: str) -> BatchNorm:
        # BatchNorm computes in float32 whatever the conv dtype; torchvision's init is 1 / 0
        # (zero_init_residual=False, so bn3 also starts at 1).
        return BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class Bottleneck(_ConvBN):
    """torchvision's Bottleneck (v1.5): 1x1 -> 3x3 with the stride -> 1x1 to 4 * planes.

    The identity path gets `downsample` (1x1 conv with the stride + BN) when the shape
    changes, which `ResNet._make_layer` makes true for the first block of every stage.
    """

    planes: int = 64
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        out_features = EXPANSION * self.planes
        y = self.conv(self.planes, 1, 1, "conv1")(x)
        y = nn.relu(self.bn("bn1")(y, use_running_average))
        y = self.conv(self.planes, 3, self.stride, "conv2")(y)
        y = nn.relu(self.bn("bn2")(y, use_running_average))
        y = self.conv(out_features, 1, 1, "conv3")(y)
        y = self.bn("bn3")(y, use_running_average)
        identity = x
        if self.stride != 1 or x.shape[-1] != out_features:
            identity = self.conv(out_features, 1, self.stride, "downsample_0")(x)
            identity = self.bn("downsample_1")(identity, use_running_average)
        return nn.relu(y + identity)


class ResNet(_ConvBN):
    """torchvision's `ResNet(Bottleneck, depths)` with `fc` = Identity, on NHWC images.

    `stem_width` and `widths` (the per-stage `planes` = bottleneck widths) are literals in
    torchvision (64 and 64/128/256/512); they are fields here so that small models of the
    same structure exist. ResNet-50: depths (3, 4, 6, 3) with the default widths.
    """

    stem_width: int = 64
    widths: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (3, 4, 6, 3)

    @property
    def embed_dim(self) -> int:
        return EXPANSION * self.widths[-1]

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # (B, H, W, 3)
        *,
        train: bool = False,
        use_running_average: bool = True,
        return_stages: bool = False,
    ) -> ResNetOutput:
        # `train` only switches stochastic depth in the other backbones; torchvision's ResNet
        # has none, so BatchNorm's mode is `use_running_average` alone.
        del train
        if len(self.widths) != len(self.depths):
            raise ValueError(f"widths {self.widths} and depths {self.depths} differ in length")
        x = self.conv(self.stem_width, 7, 2, "conv1")(x)
        x = nn.relu(self.bn("bn1")(x, use_running_average))
        # PyTorch pads the max-pool with -inf, as flax's max_pool does with explicit padding.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stages = [x]
        for s, (planes, depth) in enumerate(zip(self.widths, self.depths, strict=True), 1):
            for b in range(depth):
                stride = 2 if s > 1 and b == 0 else 1
                x = Bottleneck(self.dtype, self.param_dtype, planes, stride, name=f"layer{s}_{b}")(
                    x, use_running_average
                )
            stages.append(x)
        # AdaptiveAvgPool2d(1) + flatten, accumulated in float32.
        feature = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
        return ResNetOutput(feature=feature, stages=tuple(stages) if return_stages else ())

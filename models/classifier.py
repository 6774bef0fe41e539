"""A small convolutional image classifier (the `classifier` family; the `classifier`
verifier of noise search scores samples with one, `metrics.classifier_verifier`).

`net(x [B, H, W, C] in [-1, 1]) -> logits [B, num_classes]` float32: 3x3 convolutions
`width -> width (stride 2) -> 2 width -> 2 width (stride 2)`, GELU after each, and one
dense layer on the flattened `image_size / 4` square of features (a global mean there,
whose receptive field of 13 pixels sees parts of a 20-pixel digit, learnt far more slowly
on MNIST: BENCHMARKS.md). Only `nnx.Param` state (no BatchNorm, no dropout), as every
network of `models.NETWORKS`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Dtype


class Classifier(nnx.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        image_size: int = 28,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        if in_channels < 1 or num_classes < 2 or width < 1 or image_size < 4:
            raise ValueError(
                f"in_channels, width >= 1, num_classes >= 2 and image_size >= 4 needed, got "
                f"{in_channels}, {width}, {num_classes}, {image_size}"
            )
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths = (width, width, 2 * width, 2 * width)
        strides = (1, 2, 1, 2)
        cin = in_channels
        convs = []
        for cout, stride in zip(widths, strides, strict=True):
            convs.append(nnx.Conv(cin, cout, (3, 3), strides=(stride, stride), **kw))
            cin = cout
        self.convs = nnx.List(convs)
        side = -(-image_size // 4)  # ceil(ceil(n / 2) / 2): two stride-2 SAME convolutions
        self.out = nnx.Linear(side * side * cin, num_classes, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        want = (self.image_size, self.image_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"Classifier expects images [B, {', '.join(map(str, want))}], "
                             f"got {list(x.shape)}")  # fmt: skip
        h = x.astype(self.dtype)
        for conv in self.convs:
            h = jax.nn.gelu(conv(h))
        return self.out(h.reshape(h.shape[0], -1)).astype(jnp.float32)

"""Networks, chosen by name in a config.

Protocols (one per family):

- `VelocityNet`: `net(x, t, *, cond=None, dt=None) -> v`, `v` shaped like `x`, float32.
  `x` is `[B, ...]` (images NHWC, vectors `[B, D]`), `t` and `dt` are `[B]` in [0, 1]
  (`t = 0` noise, `t = 1` data). `cond` is `None`, an int label `[B]` (the index
  `num_classes` is the null label for classifier-free guidance; `None` means null), or a
  float embedding `[B, E]`. `dt` is the shortcut step size, already normalised to [0, 1]
  (`0` = the flow-matching limit); a net built without a `dt` input rejects one.
- `Flow`: `forward(x, *, cond=None) -> (z, logdet)` and `inverse(z, *, cond=None) -> x`.
- `Classifier`: `net(x) -> logits [B, num_classes]` float32, images `x` `[B, H, W, C]` in
  [-1, 1] (no time, no condition: the `classifier` family, `models/classifier.py`).
- `Autoencoder`: `encode(x) -> (mean, logvar)` of latent tokens `[B, T, d]`, `decode(z) -> x`
  (the `vae` family, `models/vae.py`: GIVT's first stage).
- `ARDensity`: `net(seq [B, T, d], *, cond=None) -> (mix_logits [B, T, k], means, scales
  [B, T, k, d])`, the Gaussian mixture of each token given those before it, plus the cached
  one-token step `decode` (the `givt` family, `models/givt.py`).

Every class is built as `Cls(**kwargs, rngs=nnx.Rngs(seed))` and holds only `nnx.Param`
state (no BatchNorm, no Rngs), so the trainer can split it into (graphdef, params) once.
"""

import inspect
from typing import Protocol

import jax
from flax import nnx

from core.errors import UserError, lookup
from models.classifier import Classifier as ClassifierNet
from models.dit import DiT
from models.givt import GIVT
from models.mlp import MLP
from models.realnvp import RealNVP
from models.sphere import SphereMLP
from models.tarflow import TarFlow
from models.unet import UNet
from models.vae import VAE


class VelocityNet(Protocol):
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        cond: jax.Array | None = None,
        dt: jax.Array | None = None,
    ) -> jax.Array: ...


class Flow(Protocol):
    def forward(
        self, x: jax.Array, *, cond: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]: ...

    def inverse(self, z: jax.Array, *, cond: jax.Array | None = None) -> jax.Array: ...


class Classifier(Protocol):
    def __call__(self, x: jax.Array) -> jax.Array: ...


class Autoencoder(Protocol):
    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]: ...

    def decode(self, z: jax.Array) -> jax.Array: ...


class ARDensity(Protocol):
    def __call__(
        self, seq: jax.Array, *, cond: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]: ...

    def decode(self, prev: jax.Array, i: jax.Array, c: jax.Array, caches: list): ...


NETWORKS = {
    "mlp": MLP,
    "unet": UNet,
    "dit": DiT,
    "sphere_mlp": SphereMLP,
    "tarflow": TarFlow,
    "realnvp": RealNVP,
    "classifier": ClassifierNet,
    "vae": VAE,
    "givt": GIVT,
}


def build(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """Build network `name` with `kwargs`; unknown names or options are a UserError."""
    cls = lookup(NETWORKS, name, "network")
    params = {k: v for k, v in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        known = ", ".join(k for k in params if k != "rngs")
        raise UserError(
            f"network {name!r} has no option(s) {', '.join(unknown)}; its options: {known}"
        )
    try:
        return cls(**kwargs, rngs=rngs)
    except ValueError as e:  # the constructors' own checks (sizes, variants, conditioning)
        raise UserError(f"network {name!r}: {str(e).strip().splitlines()[0]}") from e

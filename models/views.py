"""One converter between the parametrizations of a denoiser on the Gaussian path.

With `x_t = (1 - t) x0 + t x1` (x0 noise, x1 data), every parametrization is a view of the
pair (data estimate `x1_hat`, noise estimate `eps_hat`) with `x_t = (1-t) eps_hat + t x1_hat`:

| kind       | network output      | -> (x1_hat, eps_hat)                        |
|------------|---------------------|---------------------------------------------|
| `velocity` | `v = x1 - x0`       | `(x + (1-t) v, x - t v)`                    |
| `data`     | `x1_hat`            | `eps = (x - t x1_hat) / (1-t)`              |
| `eps`      | `eps_hat`           | `x1_hat = (x - (1-t) eps)/t`                |
| `score`    | `∇ log p_t(x)`      | `eps_hat = -(1-t) score`                    |

(`data` is what diffusion papers call "x0-prediction": their x0 is the data.)
Hence `score = (t v - x) / (1 - t)`. Conversions divide by `t` or `1 - t`; `t` is clipped
to `[t_min, 1 - t_min]` where a division needs it.
"""

import jax.numpy as jnp

KINDS = ("velocity", "data", "eps", "score")


def _bt(t, x):
    return t.reshape(t.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


def to_pair(kind: str, out, x, t, t_min: float = 1e-5):
    """(x1_hat, eps_hat) from a network output of `kind`."""
    t = _bt(t, x)
    if kind == "velocity":
        return x + (1.0 - t) * out, x - t * out
    if kind == "data":
        return out, (x - t * out) / jnp.maximum(1.0 - t, t_min)
    if kind == "eps":
        return (x - (1.0 - t) * out) / jnp.maximum(t, t_min), out
    if kind == "score":
        eps = -(1.0 - t) * out
        return (x - (1.0 - t) * eps) / jnp.maximum(t, t_min), eps
    raise ValueError(f"unknown parametrization {kind!r}; known: {KINDS}")


def from_pair(kind: str, x1_hat, eps_hat, x, t, t_min: float = 1e-5):
    """A network output of `kind` from (x1_hat, eps_hat)."""
    if kind == "velocity":
        return x1_hat - eps_hat
    if kind == "data":
        return x1_hat
    if kind == "eps":
        return eps_hat
    if kind == "score":
        return -eps_hat / jnp.maximum(1.0 - _bt(t, x), t_min)
    raise ValueError(f"unknown parametrization {kind!r}; known: {KINDS}")


def convert(net, source: str, target: str, t_min: float = 1e-5):
    """Wrap `net` (outputs of kind `source`) so it returns kind `target`, same signature."""
    if source == target:
        return net

    def view(x, t, *, cond=None, dt=None):
        out = net(x, t, cond=cond, dt=dt)
        x1_hat, eps_hat = to_pair(source, out, x, t, t_min)
        return from_pair(target, x1_hat, eps_hat, x, t, t_min)

    return view

"""Pure loss functions, chosen by name in a config.

Conventions (stated once, here, for the whole codebase):

- `t` in [0, 1]; `t = 0` is noise `x0 ~ N(0, I)`, `t = 1` is data `x1`.
  `x_t = (1 - t) x0 + t x1`; the target velocity is `v = x1 - x0`.
- `dt` is the shortcut step size in [0, 1]; `x` is `[B, ...]`, `t` and `dt` are `[B]`.
- Sphere points have `|x| = 1`; paths there are geodesics from uniform noise.
- A batch is a dict: `"x"` (data, float32, images scaled to [-1, 1]) and optionally
  `"cond"` (int labels `[B]` or embeddings `[B, E]`).
- A loss is `loss(net, batch, key, **hparams) -> (per_example [B], metrics dict)`; the
  trainer reduces. Frozen networks (an EMA teacher, ...) are keyword-only extras named in
  `FROZEN_NETS`: the trainer passes `ema_net` (the EMA weights) to a loss whose signature
  names it, and `teacher_ema_net` (a second EMA, `config.teacher_ema_decay`) when it keeps one.
- Randomness is explicit (`key`); networks are deterministic. Label dropout, time sampling
  and noise live here, never in networks.
"""

import functools
import inspect

from core.errors import UserError, lookup
from losses.classification import loss_cross_entropy
from losses.flow_matching import loss_flow_matching
from losses.flow_nll import loss_flow_nll
from losses.givt import loss_givt
from losses.shortcut import loss_shortcut
from losses.sphere import loss_sphere_fm
from losses.vae import loss_vae

FROZEN_NETS = ("ema_net", "teacher_ema_net")  # never options: the trainer supplies them

LOSSES = {
    "flow_matching": loss_flow_matching,
    "sphere_fm": loss_sphere_fm,
    "shortcut": loss_shortcut,
    "flow_nll": loss_flow_nll,
    "cross_entropy": loss_cross_entropy,
    "vae": loss_vae,
    "givt": loss_givt,
}


def frozen_nets(loss_fn) -> tuple[str, ...]:
    """The names of `FROZEN_NETS` that `loss_fn`'s signature takes."""
    params = inspect.signature(loss_fn).parameters
    return tuple(name for name in FROZEN_NETS if name in params)


def build(name: str, **hparams):
    """The loss `name` with its hyper-parameters bound (`functools.partial`)."""
    fn = lookup(LOSSES, name, "loss")
    params = inspect.signature(fn).parameters
    unknown = sorted(k for k in hparams if k not in params)
    if unknown:
        # networks arrive as `<name>_net` (FROZEN_NETS, frozen runs): not options
        known = [
            k for k, p in params.items() if p.kind == p.KEYWORD_ONLY and not k.endswith("_net")
        ]
        raise UserError(
            f"loss {name!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(known)}"
        )
    return functools.partial(fn, **hparams)

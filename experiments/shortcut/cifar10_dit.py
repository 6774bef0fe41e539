r"""Shortcut model (Frans et al. 2024) on CIFAR-10 (32×32×3) with DiT-B/2: one network that
samples in 1, 2, 4, ..., 128 steps.

  python -m scripts.train --config experiments/shortcut/cifar10_dit.py \
      --workdir runs/cifar10_shortcut

Needs CIFAR-10 through tensorflow-datasets. One GPU or more (bf16, batch 256: 32
self-consistency rows for the 7 bootstrap levels). Sample grids use one step; any power of
two up to `loss.max_steps` (one value with `sample.options.max_steps`) works. Variants:
`:size=S/2` (or L/2 ...); `:cond=True` (class-conditional with label dropout and guidance
1.5 inside the bootstrap targets, as in the paper: k < 128 steps sample with cfg_scale 1,
128 steps, the plain flow-matching velocity, with `cfg_scale=1.5`). Not yet trained by this
project: no expected FID.
"""

from core.config import base_config, parse_variant
from experiments.presets import dit, make_conditional, shortcut, shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(arg, size="B/2", cond=False, smoke=False)
    c = base_config()
    c.total_steps = 400_000
    c.batch_size = 256
    c.log_every = 100
    c.ckpt_every = 10_000
    c.sample_every = 10_000
    c.ema_decay = 0.999  # the EMA is the bootstrap teacher: it must follow the net closely
    c.compute_dtype = "bfloat16"
    c.optim.update(lr=1e-4, warmup_steps=5_000, weight_decay=0.0, grad_clip=1.0)  # as FM's DiT
    c.data.update(name="cifar10", split="train", random_flip=True)
    c.model = dict(dit(3, v.size), use_dt=True)
    shortcut(c)
    c.sample.num = 64
    if v.cond:
        make_conditional(c, num_classes=10)
    if v.smoke:
        shrink_for_smoke(c)
    return c

r"""Flow matching on CIFAR-10 with DiT-B/2 (bf16, batch 256, AdamW 1e-4), the setting of
`scripts/bench.py`'s DiT numbers.

  python -m scripts.train --config experiments/flow_matching/cifar10_dit.py \
      --workdir runs/cifar10_dit

Variants: `:size=S/2` (or L/2, XL/2, B/4 ...), `:cond=True` (class-conditional with label
dropout, for classifier-free guidance). Not yet trained by this project: no expected FID.
"""

from core.config import base_config, parse_variant
from experiments.presets import dit, make_conditional, shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(arg, size="B/2", cond=False, smoke=False)
    c = base_config()
    c.total_steps = 400_000
    c.batch_size = 256
    c.log_every = 100
    c.ckpt_every = 10_000
    c.sample_every = 10_000
    c.ema_decay = 0.9999
    c.compute_dtype = "bfloat16"
    c.optim.update(lr=1e-4, warmup_steps=5_000, weight_decay=0.0, grad_clip=1.0)
    c.data.update(name="cifar10", split="train", random_flip=True)
    c.model = dit(3, v.size)
    c.loss = dict(name="flow_matching", time_sampling="logit_normal")
    c.sample.update(sampler="heun", num_steps=50, num=64)
    if v.cond:
        make_conditional(c, num_classes=10)
    if v.smoke:
        shrink_for_smoke(c)
        c.compute_dtype = "float32"
    return c

r"""The trained networks of the lost-dimensions study: flow matching with an MLP on `n`
points of a linear manifold with variance blocks (`data/linear_blocks.py`: by default
ambient dimension 16, two blocks of 2 dimensions of variance 1.0 and 0.1). One per N:

  python -m scripts.train --config experiments/memorization/linear_blocks_mlp.py:n=64 \
      --workdir runs/lostdim/n64

`scripts.lost_dimensions --train-root runs/lostdim` trains one per N of its grid and
measures them beside the closed-form empirical score.

Variants: `n` (training-set size), `steps`, `hidden`, `depth`, `seed`, and the data's
`ambient_dim`, `vars` (block variances, separated by "/", e.g. `vars=1.0/0.1`), `dims`
(block sizes, e.g. `dims=2/2`); `smoke=True`: 2 steps.
"""

from core.config import base_config, parse_variant
from experiments.presets import shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(
        arg, n=64, steps=4000, hidden=256, depth=3, seed=0, ambient_dim=16, vars="1.0/0.1",
        dims="2/2", smoke=False,
    )  # fmt: skip
    c = base_config()
    c.update(total_steps=v.steps, batch_size=256, seed=v.seed, log_every=max(1, v.steps // 20))
    c.update(ckpt_every=v.steps, sample_every=0, ema_decay=0.999, ema_warmup=True)
    c.optim.update(lr=1e-3, warmup_steps=min(200, v.steps), schedule="cosine")
    c.data.update(name="linear_blocks", split="train")
    c.data.options = dict(
        num_examples=v.n,
        seed=v.seed,
        ambient_dim=v.ambient_dim,
        block_dims=tuple(int(k) for k in str(v.dims).split("/")),
        block_vars=tuple(float(x) for x in str(v.vars).split("/")),
    )
    c.model = dict(name="mlp", dim=v.ambient_dim, hidden=v.hidden, depth=v.depth)
    c.loss = dict(name="flow_matching", time_sampling="uniform")
    c.sample.update(sampler="heun", num_steps=32, num=256)
    if v.smoke:
        shrink_for_smoke(c)
    return c

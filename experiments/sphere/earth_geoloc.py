r"""Conditional flow matching on the sphere: geolocation from an embedding.

  python -m scripts.train --config experiments/sphere/earth_geoloc.py \
      --workdir runs/earth_geoloc

The setting of "Around the World in 80 Timesteps" (arXiv 2412.06781) in miniature: the
network predicts where an event happened from an embedding of it (condition dropout 10 %
for classifier-free guidance). Image embeddings are not available offline, so the
condition is a synthetic noisy location embedding of the earthquake events
(data/earth.py: GeolocSource). Evaluated by great-circle error, accuracy within
1/25/200/750/2500 km and GeoScore of samples against the true places
(`python -m scripts.evaluate --workdir runs/earth_geoloc --metrics geo --split test`).
Variants: `:dataset=fire`, `:noise=0.5`, `:steps=N`, `:smoke=True`.
"""

from core.config import base_config, parse_variant
from experiments.presets import shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(arg, dataset="earthquake", noise=0.3, steps=20_000, smoke=False)
    c = base_config()
    c.total_steps = v.steps
    c.batch_size = 512
    c.log_every = 500
    c.ckpt_every = 5_000
    c.sample_every = 5_000
    c.ema_decay = 0.999
    c.optim.update(lr=1e-3, warmup_steps=500, schedule="cosine", grad_clip=0.0)
    c.data.update(name="earth_geoloc", split="train")
    c.data.options.update(dataset=v.dataset, noise=v.noise, embed_dim=64)
    c.model = dict(name="sphere_mlp", dim=3, hidden=256, depth=4, cond_dim=64)
    c.loss = dict(name="sphere_fm", cond_drop_prob=0.1)
    c.sample.update(
        sampler="sphere_rk4",
        num_steps=50,
        num=1024,
        prior="sphere_uniform",
        plot="world_map",
        cfg_scale=1.0,
    )
    if v.smoke:
        shrink_for_smoke(c)
        c.model.update(hidden=32, depth=2)
    return c

"""Quickstart: flow matching on 2-D two moons with an MLP, on CPU in about two minutes.

  python -m scripts.train --config experiments/quickstart.py --workdir runs/quickstart

Leaves config.json, checkpoints/, metrics.jsonl, tensorboard/ and samples.png (samples
beside the data) in the workdir. Variants: `:dataset=checkerboard` (or 8gaussians; the
checkerboard needs longer training for sharp corners), `:smoke=True`.
"""

from core.config import base_config, parse_variant
from experiments.presets import shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(arg, dataset="moons", smoke=False)
    c = base_config()
    c.total_steps = 4_000
    c.batch_size = 256
    c.log_every = 200
    c.ckpt_every = 1_000
    c.sample_every = 1_000
    c.ema_decay = 0.999
    c.ema_warmup = True  # a run stopped early (train_seconds) still samples from a fair EMA
    c.optim.update(lr=1e-3, warmup_steps=200, schedule="cosine")
    c.data.update(name=v.dataset, split="train")
    c.model = dict(name="mlp", dim=2, hidden=128, depth=3)
    c.loss = dict(name="flow_matching", time_sampling="uniform")
    c.sample.update(sampler="heun", num_steps=32, num=4096)
    if v.smoke:
        shrink_for_smoke(c)
    return c

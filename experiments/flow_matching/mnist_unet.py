r"""Flow matching on MNIST (28×28×1) with an ADM-style U-Net (or `:net=dit`, DiT-S/2).

  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.train \
      --config experiments/flow_matching/mnist_unet.py --workdir runs/mnist_unet

Class-conditional with label dropout (for guidance): `:cond=True`. One GPU. EMA 0.9999 with
a warm-up (`ema_warmup`: decay `min(0.9999, (1 + n) / (10 + n))` at update n), so that the
EMA of a short run is not held back by the initialisation.
"""

from core.config import base_config, parse_variant
from experiments.presets import image_net, make_conditional, shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(arg, net="unet", dit="S/2", cond=False, smoke=False)
    c = base_config()
    c.total_steps = 50_000
    c.batch_size = 128
    c.log_every = 100
    c.ckpt_every = 5_000
    c.sample_every = 5_000
    c.ema_decay = 0.9999
    c.ema_warmup = True
    c.compute_dtype = "bfloat16"
    c.optim.update(lr=2e-4 if v.net == "unet" else 1e-4, warmup_steps=1_000)
    c.data.update(name="mnist", split="train")
    c.model = image_net(v.net, "mnist", 1, v.dit)
    c.loss = dict(name="flow_matching", time_sampling="logit_normal")
    c.sample.update(sampler="heun", num_steps=50, num=64)
    if v.cond:
        make_conditional(c, num_classes=10)
    if v.smoke:
        shrink_for_smoke(c)
        c.compute_dtype = "float32"
    return c

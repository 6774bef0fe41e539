r"""Flow matching on CIFAR-10 (32×32×3) with the DDPM++ / ADM-size U-Net (38.3M params).

  python -m scripts.train --config experiments/flow_matching/cifar10_unet.py \
      --workdir runs/cifar10_unet

Needs CIFAR-10 through tensorflow-datasets (downloaded by name on a machine with internet;
preparing it needs `pip install -e '.[prepare]'`). Class-conditional with label dropout:
`:cond=True`. Not yet trained by this project: no expected FID is claimed here.
"""

from core.config import base_config, parse_variant
from experiments.presets import image_net, make_conditional, shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(arg, net="unet", dit="B/2", cond=False, smoke=False)
    c = base_config()
    c.total_steps = 400_000
    c.batch_size = 128
    c.log_every = 100
    c.ckpt_every = 10_000
    c.sample_every = 10_000
    c.ema_decay = 0.9999
    c.compute_dtype = "bfloat16"
    c.optim.update(lr=2e-4 if v.net == "unet" else 1e-4, warmup_steps=5_000, grad_clip=1.0)
    c.data.update(name="cifar10", split="train", random_flip=True)
    c.model = image_net(v.net, "cifar10", 3, v.dit)
    c.loss = dict(name="flow_matching", time_sampling="uniform")
    c.sample.update(sampler="heun", num_steps=50, num=64)
    if v.cond:
        make_conditional(c, num_classes=10)
    if v.smoke:
        shrink_for_smoke(c)
        c.compute_dtype = "float32"
    return c

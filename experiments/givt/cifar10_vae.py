r"""The β-VAE of GIVT's first stage on CIFAR-10 (32×32×3): an 8×8 grid of 16-channel tokens
(two stride-2 levels; the paper's ImageNet VAE has 16 channels on a 16×16 grid), β = 5e-5
as the paper's ImageNet VAE (its `½ ||x_hat - x||²` summed over pixels, as here).

  python -m scripts.train --config experiments/givt/cifar10_vae.py --workdir runs/cifar_vae

Needs CIFAR-10 through tensorflow-datasets (downloaded by name on a machine with internet).
Not run by this project: no expected numbers are claimed. Stage two:
`experiments/givt/cifar10_givt.py`.
"""

from core.config import base_config, parse_variant
from experiments.presets import shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(arg, latent_dim=16, beta=5e-5, steps=200_000, smoke=False)
    c = base_config()
    c.total_steps = v.steps
    c.batch_size = 128
    c.log_every = 100
    c.ckpt_every = 10_000
    c.sample_every = 0
    c.ema_decay = 0.9999
    c.ema_warmup = True
    c.optim.update(lr=1e-4, warmup_steps=2_000, schedule="cosine", weight_decay=0.0)
    c.data.update(name="cifar10", split="train", random_flip=True)
    c.model = dict(name="vae", in_channels=3, image_size=32, latent_dim=v.latent_dim, ch=128,
                   ch_mult=(1, 2, 2), num_res_blocks=2)  # fmt: skip
    c.loss = dict(name="vae", beta=v.beta)
    if v.smoke:
        shrink_for_smoke(c)
        c.model.update(ch=8, num_res_blocks=1)
    return c

r"""GIVT on the latents of the CIFAR-10 β-VAE (`experiments/givt/cifar10_vae.py`: 64 tokens of
16 channels), class-conditional (label dropout 0.1), k = 16 mixture components, the paper's
GIVT sizes as the `size` variant (big_vision's `givt_imagenet2012.py`: base 12 layers of
width 768, default 24 of 1024, large 48 of 1536; `S` is a smaller 8 of 512), Adam β2 = 0.95,
lr 1e-3 cosine with 10 % warm-up, weight decay 1e-4; sampling temperature 0.95 and DB-CFG
w = 0.4 (`--cfg 1.4`) as the paper's ImageNet defaults.

  python -m scripts.train --config experiments/givt/cifar10_vae.py --workdir runs/cifar_vae
  python -m scripts.train --config experiments/givt/cifar10_givt.py:size=base \
      --workdir runs/cifar_givt --config.frozen.vae.workdir=runs/cifar_vae
  python -m scripts.evaluate --workdir runs/cifar_givt --num 50000 --metrics fid,nll \
      --out eval.json

Needs CIFAR-10 through tensorflow-datasets. Not run by this project: no expected numbers are
claimed. The paper's decoder dropout (0.1-0.3) is not implemented.
"""

from core.config import base_config, parse_variant
from experiments.presets import make_conditional, shrink_for_smoke

SIZES = {
    "S": dict(width=512, depth=8, head_dim=64),
    "base": dict(width=768, depth=12, head_dim=64),
    "default": dict(width=1024, depth=24, head_dim=64),
    "large": dict(width=1536, depth=48, head_dim=96),
}


def get_config(arg: str | None = None):
    v = parse_variant(arg, size="S", k=16, latent_dim=16, cond=True, steps=300_000, smoke=False)
    if v.size not in SIZES:
        raise ValueError(f"unknown size {v.size!r}; known: {', '.join(SIZES)}")
    c = base_config()
    c.total_steps = v.steps
    c.batch_size = 256
    c.log_every = 100
    c.ckpt_every = 10_000
    c.sample_every = 10_000
    c.ema_decay = 0.9999
    c.ema_warmup = True
    c.compute_dtype = "bfloat16"
    c.optim.update(lr=1e-3, warmup_steps=v.steps // 10, schedule="cosine", b2=0.95,
                   weight_decay=1e-4, grad_clip=1.0)  # fmt: skip
    c.data.update(name="cifar10", split="train", random_flip=True)
    c.model = dict(name="givt", tokens=64, token_dim=v.latent_dim, num_mixtures=v.k,
                   num_classes=0, **SIZES[v.size])  # fmt: skip
    c.loss = dict(name="givt", posterior="sample")
    c.sample.update(sampler="givt", num_steps=1, num=64)
    c.sample.options = dict(temperature=0.95, mix_temperature=1.0, cfg_exact=True, cfg_tries=16)
    if v.cond:
        make_conditional(c, num_classes=10, drop_prob=0.1, cfg_scale=1.4)
    if v.smoke:
        shrink_for_smoke(c)
        c.compute_dtype = "float32"
        c.model.update(width=32, depth=1, head_dim=16, num_mixtures=2)
    return c

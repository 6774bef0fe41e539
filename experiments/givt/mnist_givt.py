r"""GIVT (arXiv 2312.02116) on the latents of an MNIST β-VAE: a causal transformer over the
7×7 = 49 latent tokens (raster order) whose head is a `k`-component Gaussian mixture per
token, class-conditional through a class token with label dropout 0.1 (classifier-free
guidance), sampled token by token and decoded by the frozen VAE.

  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.train \
      --config experiments/givt/mnist_vae.py --workdir runs/vae
  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.train \
      --config experiments/givt/mnist_givt.py --workdir runs/givt \
      --config.frozen.vae.workdir=runs/vae
  python -m scripts.sample --workdir runs/givt --num 10000 --sampler givt --cfg 2.0 \
      --sample-option temperature=0.9 --out s.npz
  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.evaluate --workdir runs/givt \
      --num 10000 --metrics fid,memorization,nll --out eval.json

The logged loss is the latents' NLL in nats per dimension; `--metrics nll` gives the test
split's (and an ELBO bound on its bits/dim through the VAE). `--cfg s` is DB-CFG with the
paper's w = s - 1 (`samplers/givt.py`); sample options `temperature` (the components'
standard deviations), `mix_temperature` (the mixture logits), `cfg_exact`, `cfg_tries`.
`model.tokens` / `model.token_dim` must be the VAE's latent shape (49 tokens of its
`latent_dim`; a mismatch is one error before anything is written). Variants: `:k=N`
(mixture components), `:latent_dim=N` (the VAE's), `:cond=False`, `:steps=N`,
`:smoke=True`. Measured numbers (CPU): BENCHMARKS.md.
"""

from core.config import base_config, parse_variant
from experiments.presets import make_conditional, shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(arg, k=8, latent_dim=4, cond=True, steps=3_000, smoke=False)
    c = base_config()
    c.total_steps = v.steps
    c.batch_size = 128
    c.log_every = 100
    c.ckpt_every = 1_000
    c.sample_every = 1_000
    c.ema_decay = 0.999
    c.ema_warmup = True
    # big_vision's GIVT optimizer: Adam β2 = 0.95, weight decay 1e-4, cosine, 10 % warm-up
    c.optim.update(lr=1e-3, warmup_steps=300, schedule="cosine", b2=0.95, weight_decay=1e-4,
                   grad_clip=1.0)  # fmt: skip
    c.data.update(name="mnist", split="train")
    c.data.options.in_memory = True
    # CPU-sized (the paper's are in experiments/givt/cifar10_givt.py's `size`)
    c.model = dict(name="givt", tokens=49, token_dim=v.latent_dim, num_mixtures=v.k, width=64,
                   depth=4, head_dim=32, num_classes=0)  # fmt: skip
    c.loss = dict(name="givt", posterior="sample")
    c.sample.update(sampler="givt", num_steps=1, num=64)  # num_steps is unused: one per token
    c.sample.options = dict(temperature=1.0, mix_temperature=1.0, cfg_exact=True, cfg_tries=16)
    if v.cond:
        make_conditional(c, num_classes=10, drop_prob=0.1, cfg_scale=1.4)  # the paper's w = 0.4
    if v.smoke:
        shrink_for_smoke(c)
        c.model.update(width=32, depth=1, head_dim=16, num_mixtures=min(v.k, 2))
    return c

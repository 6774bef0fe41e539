r"""The β-VAE of GIVT's first stage on MNIST (28×28×1): a convolutional encoder to a 7×7 grid
of `latent_dim`-channel tokens (two stride-2 levels), a diagonal Gaussian posterior, and a
mirrored decoder, trained by `½ ||x_hat - x||² + β KL` (`losses/vae.py`).

  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.train \
      --config experiments/givt/mnist_vae.py --workdir runs/vae
  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.evaluate \
      --workdir runs/vae --metrics recon --out vae_eval.json

The logged `recon_mse` (per pixel on [-1, 1]), `kl_per_token` (nats) and `decoder_std`
describe the run; `scripts.evaluate --metrics recon` gives the test split's reconstruction
error, KL per token and the FID of the reconstructions. Stage two is
`experiments/givt/mnist_givt.py` with `--config.frozen.vae.workdir=runs/vae`. Variants:
`:latent_dim=N` (channels per token), `:beta=F`, `:steps=N`, `:smoke=True`. Measured numbers
(CPU): BENCHMARKS.md.
"""

from core.config import base_config, parse_variant
from experiments.presets import shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(arg, latent_dim=4, beta=0.01, steps=3_000, smoke=False)
    c = base_config()
    c.total_steps = v.steps
    c.batch_size = 128
    c.log_every = 100
    c.ckpt_every = 1_000
    c.sample_every = 0  # a VAE draws no samples: its numbers are reconstructions
    c.ema_decay = 0.999
    c.ema_warmup = True
    c.optim.update(lr=1e-3, warmup_steps=200, schedule="cosine", weight_decay=0.0)
    c.data.update(name="mnist", split="train")
    c.data.options.in_memory = True
    # CPU-sized: 16 channels at 28x28 (32 took ~3 s a step of batch 128 on the 2-core CPU)
    c.model = dict(name="vae", in_channels=1, image_size=28, latent_dim=v.latent_dim, ch=16,
                   ch_mult=(1, 2, 2), num_res_blocks=1)  # fmt: skip
    c.loss = dict(name="vae", beta=v.beta)
    if v.smoke:
        shrink_for_smoke(c)
        c.model.ch = 8
    return c

r"""Shortcut model on CelebA-HQ 256×256, the paper's setting (Frans et al. 2024):
DiT-B, batch 64, 410k steps, AdamW 1e-4 (weight decay 0.1, no warm-up or clipping, as the
official code), EMA 0.999 as the bootstrap teacher, bootstrap_every 8 with 128 max steps,
unconditional. One GPU or more.

  python -m scripts.train --config experiments/shortcut/celebahq256_dit.py \
      --workdir runs/celebahq256_shortcut

Data: tfds `celeb_a_hq/256` (30,000 images, split `train`, no labels) needs a manual
download: put `data256x256.tar` (made with progressive_growing_of_gans' dataset tool) in
`<data_dir>/downloads/manual/`, then the first run prepares it (needs `pip install -e
'.[prepare]'`). The split is held in memory (5.9 GB of uint8).

Pixels, not latents: the paper's DiT-B/2 runs on Stable-Diffusion VAE latents (32×32×4,
256 tokens), and driftlab has no VAE encoder yet, so the default is DiT-B/8 on pixels
(8×8-pixel patches, 1024 tokens); `:size=B/4` is finer, with four times the tokens. FIDs
are therefore not comparable with the paper's. Sample grids use one step; any power of two
up to 128 works. `:smoke=True` is the CPU test size. Not yet trained by this project.
"""

from core.config import base_config, parse_variant
from experiments.presets import dit, shortcut, shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(arg, size="B/8", smoke=False)
    c = base_config()
    c.total_steps = 410_000
    c.batch_size = 64  # 8 self-consistency rows: one for each of the 7 bootstrap levels
    c.log_every = 100
    c.ckpt_every = 10_000
    c.sample_every = 10_000
    c.ema_decay = 0.999
    c.compute_dtype = "bfloat16"
    c.optim.update(lr=1e-4, warmup_steps=0, weight_decay=0.1, grad_clip=0.0)
    c.data.update(name="celeb_a_hq/256", split="train", random_flip=True)
    c.model = dict(dit(3, v.size), use_dt=True)
    shortcut(c)
    c.sample.num = 16
    if v.smoke:
        shrink_for_smoke(c)
    return c

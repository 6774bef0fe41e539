r"""TarFlow on ImageNet 64×64, the paper's setting (Zhai et al. 2024, Table/README of
apple/ml-tarflow): patch 2 (1024 tokens of 12 values), width 768, 8 flow blocks × 8
causal transformer layers (head size 64), Gaussian noise σ = 0.05, batch 256, AdamW
lr 1e-4 (β2 = 0.95, weight decay 1e-4) with one epoch of warm-up and cosine decay, 200
epochs (~1M steps), random flips. Conditional (`:cond=True`): label dropout 0.1, sampled
with annealed guidance, paper weight g = 2.3, i.e. `cfg_scale = 1 + g = 3.3` here.

  python -m scripts.train --config experiments/nf/imagenet64_tarflow.py \
      --workdir runs/imagenet64_tarflow

Data: tfds `imagenet_resized/64x64` (Chrabaszcz et al.'s box-resized ImageNet, with labels;
downloaded by name), or `:data=imagenet2012` (ILSVRC2012, manual download into tfds's
manual_dir, center crop + resize to 64 as the paper's loader). `:noise=uniform` is the
paper's density-estimation model (uniform dequantization, float32, 100 epochs; the loss is
an upper bound on bits/dim; no denoising). Needs several GPUs for the paper's schedule; not
trained by this project, so no expected FID / bits/dim is claimed.
"""

from core.config import base_config, parse_variant
from experiments.presets import make_conditional, shrink_for_smoke

DATA = {"imagenet_resized": "imagenet_resized/64x64", "imagenet2012": "imagenet2012"}
STEPS_PER_EPOCH = 1_281_167 // 256


def get_config(arg: str | None = None):
    v = parse_variant(arg, data="imagenet_resized", noise="gaussian", cond=False, smoke=False)
    if v.data not in DATA:
        raise ValueError(f"unknown data {v.data!r}; known: {', '.join(DATA)}")
    gaussian = v.noise == "gaussian"
    c = base_config()
    c.total_steps = (200 if gaussian else 100) * STEPS_PER_EPOCH
    c.batch_size = 256
    c.log_every = 100
    c.ckpt_every = 10_000
    c.sample_every = 20_000
    c.ema_decay = 0.9999
    c.compute_dtype = "bfloat16" if gaussian else "float32"  # as the reference (AMP off)
    c.optim.update(
        lr=1e-4,
        warmup_steps=STEPS_PER_EPOCH,
        schedule="cosine",
        b2=0.95,
        weight_decay=1e-4,
        grad_clip=1.0,
    )
    c.data.update(name=DATA[v.data], split="train", random_flip=True)
    if v.data == "imagenet2012":
        c.data.image_size = 64
    c.model = dict(
        name="tarflow",
        in_channels=3,
        image_size=64,
        patch=2,
        width=768,
        num_blocks=8,
        layers_per_block=8,
        head_dim=64,
    )
    c.loss = dict(name="flow_nll", noise=v.noise, noise_std=0.05)
    c.sample.update(sampler="tarflow", num_steps=1, num=64)  # num_steps is unused by flows
    c.sample.options = dict(noise_std=0.05, denoise=gaussian, inverse="sequential")
    if v.cond:
        make_conditional(c, num_classes=1000, drop_prob=0.1, cfg_scale=3.3)
        c.sample.options.guidance_anneal = True
    if v.smoke:
        shrink_for_smoke(c)
        c.model.update(patch=8, width=32, num_blocks=2, layers_per_block=1, head_dim=16)
        c.compute_dtype = "float32"
    return c

r"""TarFlow on ImageNet 64×64, the paper's setting (Zhai et al. 2024, Table/README of
apple/ml-tarflow): patch 2 (1024 tokens of 12 values), width 768, 8 flow blocks × 8
causal transformer layers (head size 64), Gaussian noise σ = 0.05, batch 256, AdamW
lr 1e-4 (β2 = 0.95, weight decay 1e-4) with one epoch of warm-up and cosine decay, 200
epochs, random flips, no gradient clipping and no EMA (ml-tarflow's train.py has neither:
`grad_clip=0`, `ema_decay=0`, so the sampled "EMA" weights are the trained ones).
Conditional (`:cond=True`): label dropout 0.1, sampled with annealed guidance, paper weight
g = 2.3, i.e. `cfg_scale = 1 + g = 3.3` here.

  python -m scripts.train --config experiments/nf/imagenet64_tarflow.py \
      --workdir runs/imagenet64_tarflow

Data, as ml-tarflow's `get_data` (`data=auto`, the default, picks by `cond`):
- conditional: `imagenet2012` (ILSVRC2012 with labels, manual download into tfds's
  manual_dir) at `image_size=64`: `data/tfds.py` takes the central square and resizes it to
  64 with PIL (bicubic, antialiased). ml-tarflow resizes the shorter side to 64 with
  torchvision (bilinear, antialiased) and then center-crops: the same crop, another kernel.
- unconditional (and `:noise=uniform`, the bits/dim model): `downsampled_imagenet/64x64`,
  van den Oord et al.'s downsampled ImageNet 64 (no labels, the images of the published
  ImageNet-64 bits/dim), used as stored. tfds downloads it from image-net.org, which may
  need the files placed by hand.
- `:data=imagenet_resized` (Chrabaszcz et al.'s box-resized ImageNet 64 with labels) is not
  the paper's data; it is here as a download-by-name stand-in.

Deviations from ml-tarflow that remain: the cosine schedule decays to 0 (theirs to 1e-6)
and warms up from 0 (theirs from 1e-6); guidance's null condition is a learned null label
(label dropout to `num_classes`), theirs the mean of the class embeddings; images are
resized with PIL bicubic (above). `:noise=uniform` is the paper's density-estimation model
(uniform dequantization, float32, 100 epochs; the loss is an upper bound on bits/dim; no
denoising). Needs several GPUs for the paper's schedule; not trained by this project, so no
expected FID / bits/dim is claimed. The sampler's `noise` and `noise_std` are the loss's
(FieldReferences): an override of the loss moves the Tweedie step.
"""

from ml_collections import FieldReference

from core.config import base_config, parse_variant
from core.errors import UserError
from experiments.presets import make_conditional, shrink_for_smoke

DATA = {
    "imagenet2012": "imagenet2012",
    "downsampled_imagenet": "downsampled_imagenet/64x64",
    "imagenet_resized": "imagenet_resized/64x64",
}
TRAIN_EXAMPLES = {  # train split sizes, for the epoch counts
    "imagenet2012": 1_281_167,
    "downsampled_imagenet": 1_281_149,
    "imagenet_resized": 1_281_167,
}
LABELS = ("imagenet2012", "imagenet_resized")  # downsampled_imagenet has no labels


def get_config(arg: str | None = None):
    v = parse_variant(arg, data="auto", noise="gaussian", cond=False, smoke=False)
    data = v.data if v.data != "auto" else "imagenet2012" if v.cond else "downsampled_imagenet"
    if data not in DATA:
        raise UserError(f"unknown data {v.data!r}; known: auto, {', '.join(DATA)}")
    if v.cond and data not in LABELS:
        raise UserError(f"data={data} has no labels; cond=True needs one of {', '.join(LABELS)}")
    gaussian = v.noise == "gaussian"
    steps_per_epoch = TRAIN_EXAMPLES[data] // 256
    c = base_config()
    c.total_steps = (200 if gaussian else 100) * steps_per_epoch
    c.batch_size = 256
    c.log_every = 100
    c.ckpt_every = 10_000
    c.sample_every = 20_000
    c.ema_decay = 0.0  # no EMA, as ml-tarflow
    c.compute_dtype = "bfloat16" if gaussian else "float32"  # as the reference (AMP off)
    c.optim.update(
        lr=1e-4,
        warmup_steps=steps_per_epoch,
        schedule="cosine",
        b2=0.95,
        weight_decay=1e-4,
        grad_clip=0.0,  # none, as ml-tarflow
    )
    c.data.update(name=DATA[data], split="train", random_flip=True)
    # imagenet2012: the central square, resized (data/tfds.py); the 64×64 sets declare no
    # fixed image shape in tfds, and at their own size this is a no-op
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
    noise, noise_std = FieldReference(v.noise), FieldReference(0.05)
    c.loss = dict(name="flow_nll", noise=noise, noise_std=noise_std)
    c.sample.update(sampler="tarflow", num_steps=1, num=64)  # num_steps is unused by flows
    c.sample.options = dict(noise=noise, noise_std=noise_std, denoise=True, inverse="sequential")
    if v.cond:
        make_conditional(c, num_classes=1000, drop_prob=0.1, cfg_scale=3.3)
        c.sample.options.guidance_anneal = True
    if v.smoke:
        shrink_for_smoke(c)
        c.model.update(patch=8, width=32, num_blocks=2, layers_per_block=1, head_dim=16)
        c.compute_dtype = "float32"
    return c

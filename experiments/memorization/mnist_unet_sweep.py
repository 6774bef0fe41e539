r"""The model of the memorization sweep: the MNIST U-Net of `flow_matching/mnist_unet.py`
trained on the first `k` training images (`train[:k]`, in memory), in float32, with the
sweep's training settings. `scripts.memorization_sweep` trains one per K and measures how
many of its samples copy a training image:

  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.memorization_sweep \
      --workdir runs/mem_sweep --out docs/memorization_vs_K

One K on its own: `python -m scripts.train --config
experiments/memorization/mnist_unet_sweep.py:k=64 --workdir runs/mem_K64`.

Variants: `k` (training-set size; 0: the whole split), `tiny=True` (the smoke U-Net and the
CPU-sized settings of `--tiny`), `mlp=True` (a residual MLP on the flattened pixels, width
`hidden`, with the settings `MLP`: the CPU-sized network of `--mlp`),
`data_path=data/mnist_{split}.npz` (MNIST as npz files, `scripts.export_npz`, instead of
tfds), `seed`, and the training settings `steps`, `batch`, `lr`, `warmup`, `ema` (EMA decay)
and `sample_steps` (Heun steps), whose defaults are `FULL` (or `TINY`, `MLP`).
`smoke=True`: the tiny network for 2 steps on 64 images.
"""

from core.config import parse_variant
from experiments.flow_matching.mnist_unet import get_config as mnist_unet

# the sweep's training settings: one GPU, 10k steps for every K
FULL = dict(k=0, steps=10_000, batch=128, lr=2e-4, warmup=1_000, ema=0.999, sample_steps=50)
# a CPU-sized check of the whole sweep (with the smoke U-Net)
TINY = dict(k=0, steps=600, batch=32, lr=1e-3, warmup=50, ema=0.98, sample_steps=16)
# the CPU sweep's network: an MLP on pixels, cheap enough for a dense K grid with seeds
MLP = dict(k=0, steps=1000, batch=32, lr=1e-3, warmup=100, ema=0.99, sample_steps=32)
SMOKE = dict(k=64, steps=2, batch=8, lr=1e-3, warmup=1, ema=0.98, sample_steps=2)


def get_config(arg: str | None = None):
    flags = dict(tiny=False, mlp=False, hidden=1024, smoke=False, data_path="", seed=0)
    preset = parse_variant(arg, **FULL, **flags)  # which defaults apply; then the variant
    defaults = SMOKE if preset.smoke else MLP if preset.mlp else TINY if preset.tiny else FULL
    v = parse_variant(arg, **defaults, **flags)
    c = mnist_unet("smoke=True" if v.tiny or v.smoke else None)
    if v.mlp:
        # wider than the 784 pixels: a narrower MLP cannot pass x_t through its bottleneck
        # (the velocity near data is ~ -x_t / (1 - t)), and never learns to copy
        c.model = dict(name="mlp", dim=28 * 28, hidden=v.hidden, depth=2)
    c.data.split = f"train[:{v.k}]" if v.k else "train"
    c.data.options.in_memory = True
    if v.data_path:
        c.data.update(name="npz", path=v.data_path)
    c.update(total_steps=v.steps, batch_size=v.batch, seed=v.seed, ema_decay=v.ema)
    c.update(log_every=max(1, v.steps // 20), ckpt_every=v.steps, sample_every=0)
    c.optim.update(lr=v.lr, warmup_steps=v.warmup)
    c.sample.num_steps = v.sample_steps
    c.compute_dtype = "float32"
    return c

r"""A small CNN classifier of MNIST digits (`models/classifier.py`), trained by
cross-entropy: the `classifier` verifier of noise search scores samples of an MNIST
generator with it (`metrics/classifier_verifier.py`, `frozen.classifier.workdir`).

  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.train \
      --config experiments/classifier/mnist_cnn.py --workdir runs/mnist_cnn
  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.evaluate \
      --workdir runs/mnist_cnn --metrics accuracy --split test

Sized for a 2-core CPU (JAX 0.10.2): 1500 steps of batch 128 (3.2 epochs, no
augmentation) took 3 min 53 s and reached 99.25 % test accuracy with the EMA weights
(2026-12-06, BENCHMARKS.md). `:smoke=True` is the CPU-test size; `:width=N`, `:steps=N`.
"""

from core.config import base_config, parse_variant
from experiments.presets import shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(arg, width=32, steps=1_500, smoke=False)
    c = base_config()
    c.total_steps = v.steps
    c.batch_size = 128
    c.log_every = 100
    c.ckpt_every = 500
    c.sample_every = 0  # a classifier draws no samples
    c.ema_decay = 0.999
    c.ema_warmup = True
    c.optim.update(lr=2e-3, warmup_steps=100, schedule="cosine", weight_decay=1e-4)
    c.data.update(name="mnist", split="train", use_labels=True)
    c.data.options.in_memory = True
    c.model = dict(name="classifier", in_channels=1, num_classes=10, width=v.width, image_size=28)
    c.loss = dict(name="cross_entropy", label_smoothing=0.0)
    if v.smoke:
        shrink_for_smoke(c)
        c.model.width = 8
    return c

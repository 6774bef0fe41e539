r"""Riemannian flow matching on the sphere: the volcano events of the Earth datasets.

  python -m scripts.train --config experiments/sphere/earth_volcano.py \
      --workdir runs/earth_volcano

The network, batch, lr and weight decay are the Riemannian FM paper's for this dataset
(experiments/presets.py: EARTH_PAPER; a GPU job). `:small=True` is a 256-wide, 4-layer MLP
with Fourier features of the position (256, up to 512 rad^-1, chosen on validation
NLL) at batch 512 for a CPU; `:steps=N` sets the training length. Test NLL (nats) with
`python -m scripts.evaluate --workdir runs/earth_volcano --metrics nll --split test`; measured
numbers, and how long each trained on what, are in BENCHMARKS.md.
"""

from experiments.presets import earth_config


def get_config(arg: str | None = None):
    return earth_config("volcano", arg)

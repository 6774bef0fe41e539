"""Every experiment config builds with `:smoke=True`, runs one train step on CPU and draws a
few samples with its own sampler and plot (but a family that generates nothing).

MNIST comes from the prepared offline copy (../shared/data/tfds); datasets that are not
available offline (CIFAR-10) run on `tfds.testing.mock_data`.
"""

import glob
import os

import jax
import numpy as np
import pytest

from core import config as config_lib
from core.experiment import Experiment
from tests.conftest import ROOT, SHARED_DATA, train

SKIP = {"__init__.py", "presets.py"}
CONFIGS = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "experiments", "**", "*.py"), recursive=True)
    if os.path.basename(p) not in SKIP and not os.path.basename(p).startswith("_")
)
CONDITIONAL = [p for p in CONFIGS if "cond=" in open(os.path.join(ROOT, p)).read()]
WITH_FM_BASELINE = [p for p in CONFIGS if ":method=fm" in open(os.path.join(ROOT, p)).read()]
OFFLINE_TFDS = {"mnist"}
TOY_OR_FILES = {"8gaussians", "moons", "checkerboard", "npz", "earth", "linear_blocks"}


def variants():
    for path in CONFIGS:
        yield f"{path}:smoke=True"
    for path in CONDITIONAL:
        yield f"{path}:smoke=True,cond=True"
    for path in WITH_FM_BASELINE:
        yield f"{path}:smoke=True,method=fm"


def _train_with_stage_one(spec: str, config, tmp_path):
    """Train `config` in `tmp_path`; a GIVT config first trains the VAE it decodes through
    (its sibling `<dataset>_vae.py`, smoke-sized) and names it as `frozen.vae`."""
    if config.loss.name == "givt":
        from ml_collections import ConfigDict

        vae_spec = spec.partition(":")[0].replace("_givt.py", "_vae.py") + ":smoke=True"
        vae_dir = f"{tmp_path}_vae"
        train(config_lib.load(os.path.join(ROOT, vae_spec)), vae_dir)
        config.frozen.vae = ConfigDict({"workdir": vae_dir})
    return train(config, str(tmp_path))


@pytest.mark.parametrize("spec", list(variants()))
def test_config_builds_and_trains_one_step(spec, tmp_path, monkeypatch):
    config = config_lib.load(os.path.join(ROOT, spec))
    config.total_steps = 1
    config.sample_every = 1  # also sample (the config's sampler, prior, guidance) and plot
    config.sample.num = 4
    name = config.data.name
    if name in TOY_OR_FILES:
        state = _train_with_stage_one(spec, config, tmp_path)
    elif name in OFFLINE_TFDS:
        monkeypatch.setenv("TFDS_DATA_DIR", os.path.join(SHARED_DATA, "tfds"))
        state = _train_with_stage_one(spec, config, tmp_path)
    else:
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=16):
            state = _train_with_stage_one(spec, config, tmp_path)
    assert int(state.step) == 1
    # a family that generates nothing (a classifier) draws no sample grid
    generates = Experiment.from_config(config).method.generates
    assert os.path.exists(tmp_path / "samples.png") == generates
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_every_config_has_a_launch_docstring():
    for path in CONFIGS:
        source = open(os.path.join(ROOT, path)).read()
        assert source.lstrip().startswith(('"""', 'r"""')), path
        assert "python -m scripts." in source, path

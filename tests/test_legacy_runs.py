"""Run directories written before the experiment / generation redesign still restore and
sample the same points: `tests/data/legacy_runs/` holds two tiny runs made by the earlier
code (`make.sh` there: a flow-matching MLP and a shortcut MLP with a teacher EMA, 4 steps
each) and the samples `scripts.sample` drew from them then (EMA and raw weights). A change
of the checkpoint layout, of the config reading or of how noise is drawn fails here."""

import os
import shutil

import numpy as np
import pytest

from core import runs

LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy_runs")


@pytest.mark.parametrize("run", ["fm_moons", "sc_moons"])
@pytest.mark.parametrize("which", ["ema", "raw"])
def test_legacy_run_samples_the_same_points(tmp_path, run, which):
    workdir = str(tmp_path / run)
    shutil.copytree(os.path.join(LEGACY, run), workdir)
    expected = np.load(os.path.join(workdir, f"expected_{which}.npz"))["arr_0"]
    # the flags make.sh sampled with: --num 16 --batch 16 --seed 3 [--raw --steps 4]
    raw = which == "raw"
    drawn = runs.sample_run(
        workdir, num=16, batch_size=16, seed=3, ema=not raw, num_steps=4 if raw else None
    )
    assert drawn.step == 4
    np.testing.assert_allclose(drawn.samples, expected, rtol=1e-5, atol=1e-6)


def test_legacy_run_resumes(tmp_path):
    """The old checkpoint (its teacher EMA included) resumes under the new trainer."""
    from core.config import from_json
    from tests.conftest import train

    workdir = str(tmp_path / "sc_moons")
    shutil.copytree(os.path.join(LEGACY, "sc_moons"), workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        config = from_json(f.read())
    config.total_steps = 6
    state = train(config, workdir)
    assert int(state.step) == 6 and state.teacher_ema is not None

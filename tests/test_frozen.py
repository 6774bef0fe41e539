"""Frozen networks from other runs (`frozen.<name>.workdir`): restored onto the mesh, handed
to the loss as `<name>_net`, never updated or saved, recorded in the new run's config.json;
a missing run or a loss that needs an unconfigured one is one error before anything is
written. A test family (a loss that distils a frozen teacher) is added as the recipe of
ARCHITECTURE.md says: one loss, one METHODS entry."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses
from core import config as config_lib
from core import methods, runs
from core.checkpoint import open_for_reading
from core.errors import UserError
from tests.conftest import ROOT, train

QUICK = f"{ROOT}/experiments/quickstart.py:smoke=True"


def loss_distill(net, batch, key, *, teacher_net):
    """|net(x, t) - teacher(x, t)|^2, and the frozen teacher's squared weight norm."""
    x = batch["x"]
    t = jax.random.uniform(key, (x.shape[0],))
    per_example = jnp.sum((net(x, t) - teacher_net(x, t)) ** 2, axis=-1)
    leaves = jax.tree.leaves(jax.tree.map(jnp.asarray, _params(teacher_net)))
    return per_example, {"teacher_norm": sum(jnp.sum(a.astype(jnp.float32) ** 2) for a in leaves)}


def _params(module):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def teacher_generation(experiment, graphdef, frozen_graphdefs):
    """A family's own generation (`Method.generation`): Euler steps of the frozen teacher,
    from the prior noise."""
    from flax import nnx

    from samplers.ode import sample_euler

    def generate(params, noise, cond, frozen):
        teacher = nnx.merge(frozen_graphdefs["teacher"], frozen["teacher"])
        steps = experiment.sampling.num_steps
        return sample_euler(teacher, noise["x_init"], None, num_steps=steps)

    return generate


@pytest.fixture
def distill_family(monkeypatch):
    monkeypatch.setitem(losses.LOSSES, "distill", loss_distill)
    entry = methods.Method(
        name="distill", loss="distill", protocol="velocity", sampler="heun",
        samplers=("heun", "euler"), prior="gaussian", output="velocity",
        generation=teacher_generation,
    )  # fmt: skip
    monkeypatch.setitem(methods.METHODS, "distill", entry)


def _teacher(tmp_path) -> str:
    workdir = str(tmp_path / "teacher")
    config = config_lib.load(QUICK)
    config.update(total_steps=4, ckpt_every=2, keep_ckpts=3)
    train(config, workdir)
    return workdir


def _student(teacher: str | None, **frozen):
    config = config_lib.load(QUICK)
    config.update(total_steps=3, ckpt_every=3, log_every=1)
    config.loss = config_lib.ConfigDict({"name": "distill"})
    if teacher is not None:
        config.frozen.teacher = config_lib.ConfigDict({"workdir": teacher, **frozen})
    return config


def _squared_norm(tree) -> float:
    return float(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in jax.tree.leaves(tree)))


def _stored(workdir: str, step: int, item: str):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), item)
    return ocp.StandardCheckpointer().restore(path)


def test_frozen_network_of_another_run(tmp_path, distill_family):
    teacher = _teacher(tmp_path)
    student = str(tmp_path / "student")
    train(_student(teacher, step=2), student)
    with open(os.path.join(student, "metrics.jsonl")) as f:
        norms = [json.loads(line)["teacher_norm"] for line in f]
    # the loss saw the teacher's step-2 EMA weights, unchanged at every step
    want = _squared_norm(_stored(teacher, 2, "ema"))
    assert len(norms) == 3 and np.allclose(norms, want, rtol=1e-5)
    assert not np.isclose(want, _squared_norm(_stored(teacher, 4, "ema")), rtol=1e-5)
    # never saved in the student's checkpoints; recorded in its config.json
    ckpt = open_for_reading(student)
    step = ckpt.latest_step()
    ckpt.close()
    items = sorted(os.listdir(os.path.join(student, "checkpoints", str(step))))
    assert not any("teacher" in item for item in items), items
    with open(os.path.join(student, "config.json")) as f:
        recorded = json.load(f)["frozen"]["teacher"]
    assert recorded == {"workdir": os.path.abspath(teacher), "step": 2, "ema": True}
    # sampling the student restores the recorded teacher and hands it to the family's
    # generation: the teacher's own Euler samples from the same noise
    drawn = runs.sample_run(student, num=8, batch_size=8, seed=1, num_steps=4)
    own = runs.sample_run(teacher, num=8, batch_size=8, seed=1, step=2, sampler="euler",
                          num_steps=4)  # fmt: skip
    np.testing.assert_allclose(drawn.samples, own.samples, rtol=1e-5, atol=1e-6)
    # the newest step when unset; raw weights with ema=False
    other = str(tmp_path / "student_raw")
    train(_student(teacher, ema=False), other)
    with open(os.path.join(other, "metrics.jsonl")) as f:
        norms = [json.loads(line)["teacher_norm"] for line in f]
    assert np.allclose(norms, _squared_norm(_stored(teacher, 4, "params")), rtol=1e-5)
    with open(os.path.join(other, "config.json")) as f:
        assert json.load(f)["frozen"]["teacher"]["step"] == 4


def test_missing_or_unneeded_frozen_networks_are_one_error(tmp_path, distill_family):
    student = str(tmp_path / "student")
    with pytest.raises(UserError, match=r"frozen.teacher.workdir=.*no such run directory"):
        train(_student(str(tmp_path / "nowhere")), student)
    with pytest.raises(UserError, match="needs the frozen network teacher_net: set frozen"):
        train(_student(None), student)
    teacher = _teacher(tmp_path)
    with pytest.raises(UserError, match=r"checkpoint step 3 not found"):
        train(_student(teacher, step=3), student)
    assert not os.path.exists(student)  # nothing was written
    config = config_lib.load(QUICK)  # flow matching takes no teacher_net
    config.frozen.teacher = config_lib.ConfigDict({"workdir": teacher})
    with pytest.raises(UserError, match="loss 'flow_matching' takes no teacher_net"):
        train(config, student)
    assert not os.path.exists(student)


def test_frozen_overrides_from_the_command_line():
    config = config_lib.load(QUICK)
    argv = ["train", "--config.frozen.vae.workdir=runs/vae", "--config.frozen.vae.step=5"]
    config_lib.add_option_overrides(config, argv)
    config_lib.check_override_keys(config, argv)
    assert set(config.frozen.vae.keys()) == {"workdir", "step", "ema"}

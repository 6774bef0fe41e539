"""The trainer: sharding invariance, exact resume after SIGKILL, divergence, run outputs."""

import json
import os
import subprocess
import textwrap

import jax
import numpy as np
import pytest

from core import config as config_lib
from core.checkpoint import Checkpoints, open_for_reading
from core.errors import TrainingDiverged, UserError
from core.train_state import learning_rate
from tests.conftest import PYTHON, ROOT, run_python, train


def quick_config(**overrides):
    c = config_lib.load("experiments/quickstart.py:smoke=True")
    c.update(overrides)
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def restore_params(workdir, step=None):
    ckpt = open_for_reading(workdir)
    step = ckpt.resolve_step(step)
    target = ckpt._manager.item_metadata(step)["params"]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), target)
    _, params = ckpt.restore_weights(target, step=step, ema=False)
    ckpt.close()
    return params


def test_run_directory_has_config_checkpoints_metrics_tensorboard_and_samples(tmp_path):
    c = quick_config(total_steps=4, ckpt_every=2, log_every=2, sample_every=4)
    train(c, str(tmp_path))
    names = set(os.listdir(tmp_path))
    assert {
        "config.json",
        "checkpoints",
        "metrics.jsonl",
        "tensorboard",
        "samples.png",
        "data_spec.json",
    } <= names
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [2, 4]
    # the logged rate is that of the update that made the step (optax counts from 0)
    lrs = [learning_rate(c.optim, c.total_steps, s - 1) for s in (2, 4)]
    assert [r["lr"] for r in rows] == pytest.approx(lrs) and lrs[0] != lrs[1]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert sorted(Checkpoints(str(tmp_path)).all_steps()) == [2, 4]
    saved = config_lib.from_json(open(tmp_path / "config.json").read())
    assert saved.total_steps == 4 and saved.model.name == "mlp"


SHARDING_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from core import config as config_lib
    from tests.conftest import train
    from core.experiment import Experiment
    out = {}
    spec, overrides = sys.argv[2], json.loads(sys.argv[3])
    for data, fsdp in [(1, 1), (8, 1), (4, 2), (1, 8)]:
        c = config_lib.load(spec)
        c.update(total_steps=3, ckpt_every=3, log_every=1)
        c.optim.warmup_steps = 0  # a warm-up would start at lr 0: parameters must move
        for key, value in overrides.items():  # a dict updates that section
            if isinstance(value, dict):
                c[key].update(value)
            else:
                c[key] = value
        c.mesh.update(data=data, fsdp=fsdp, fsdp_min_size=0)
        state = train(c, f"{sys.argv[1]}/{data}x{fsdp}", devices=jax.devices()[:data * fsdp])
        leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
        init = jax.tree.leaves(Experiment.from_config(c).network.init(c.seed))
        moved = max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(leaves, init))
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
        with open(f"{sys.argv[1]}/{data}x{fsdp}/metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        out[f"{data}x{fsdp}"] = {
            "loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows],
            "params": [a.tolist() for a in leaves], "specs": specs, "moved": moved,
        }
    print(json.dumps(out))
""")
MESH_CASES = {
    "flow_matching": (
        "experiments/quickstart.py:smoke=True",
        dict(batch_size=16, model=dict(hidden=64, depth=2)),
    ),
    # the shortcut loss with minibatch OT: one plan over the global batch on every mesh (a
    # plan per shard would pair within a shard's rows and change the losses)
    "shortcut_ot": (
        "experiments/shortcut/moons_mlp.py:smoke=True",
        dict(batch_size=64, loss=dict(bootstrap_every=8, max_steps=8, ot_pairing=True)),
    ),
}


@pytest.mark.parametrize("case", MESH_CASES)
def test_three_steps_are_the_same_on_every_mesh(case, tmp_path, python_env):
    spec, overrides = MESH_CASES[case]
    args = ["-c", SHARDING_SCRIPT, str(tmp_path), spec, json.dumps(overrides)]
    proc = run_python(args, python_env, devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = out.pop("1x1")
    assert ref["moved"] > 1e-3 and len(ref["loss"]) == 3  # the updates are compared too
    assert "PartitionSpec(None, 'fsdp')" in str(out["1x8"]["specs"]) or any(
        "fsdp" in s for s in out["1x8"]["specs"]
    )
    for mesh, got in out.items():
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5, err_msg=mesh)
        np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4, err_msg=mesh)
        for a, b in zip(got["params"], ref["params"]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=mesh)


def test_a_resume_that_does_not_fit_the_config_is_an_error_and_changes_nothing(tmp_path):
    train(quick_config(total_steps=2, ckpt_every=2, log_every=1), str(tmp_path))
    before = {n: open(tmp_path / n).read() for n in ("config.json", "metrics.jsonl")}
    wider = quick_config(total_steps=4, ckpt_every=2, log_every=1)
    wider.model.hidden = 2 * wider.model.hidden
    with pytest.raises(UserError, match=r"step-2 checkpoint.*changed: model.hidden 32 -> 64.*"
                       r"wanted \(64"):  # fmt: skip
        train(wider, str(tmp_path))
    assert {n: open(tmp_path / n).read() for n in before} == before
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["checkpoints", "config.json", "data_spec.json", "metrics.jsonl", "tensorboard",
         "train.lock"]
    )


RESUME_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from core import config as config_lib
    from tests.conftest import train
    workdir, kill_at = sys.argv[1], int(sys.argv[2])
    c = config_lib.load("experiments/quickstart.py:smoke=True")
    c.update(total_steps=8, ckpt_every=2, log_every=1)
    def hook(step, state):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train(c, workdir, hooks=[hook])
""")


def test_resume_after_sigkill_gives_identical_parameters(tmp_path, python_env):
    run = lambda workdir, kill_at: subprocess.run(
        [PYTHON, "-c", RESUME_SCRIPT, str(workdir), str(kill_at)],
        cwd=ROOT,
        env=python_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    straight = run(tmp_path / "straight", 0)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run(tmp_path / "killed", 5)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert Checkpoints(str(tmp_path / "killed")).latest_step() in (2, 4)
    resumed = run(tmp_path / "killed", 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = restore_params(tmp_path / "straight"), restore_params(tmp_path / "killed")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps = [r["step"] for r in read_metrics(tmp_path / "killed")]
    assert steps == list(range(1, 9))  # lines after the restored step were dropped, redone


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, arr_0=rng.normal(size=(64, 2)).astype(np.float32))
    np.savez(bad, arr_0=np.full((64, 2), 1e25, np.float32))  # finite data, inf loss
    c = quick_config(total_steps=4, ckpt_every=2, log_every=2)
    c.data.update(name="npz", path=str(good))
    train(c, str(tmp_path / "run"))
    before = restore_params(tmp_path / "run", 4)
    c = quick_config(total_steps=8, ckpt_every=2, log_every=2)
    c.data.update(name="npz", path=str(bad))
    with pytest.raises(TrainingDiverged, match=r"NaN/inf between steps 5 and 6.*step 4"):
        train(c, str(tmp_path / "run"), allow_changes=True)  # the data file changes
    assert Checkpoints(str(tmp_path / "run")).all_steps() == [2, 4]
    after = restore_params(tmp_path / "run", 4)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_learning_rate_schedule_with_warmup_cosine_and_a_run_shorter_than_its_warmup():
    from core.errors import UserError
    from core.train_state import learning_rate, make_optimizer

    opt = dict(lr=1e-3, warmup_steps=100, schedule="cosine")
    assert learning_rate(opt, 1100, 50) == pytest.approx(5e-4)  # linear warm-up
    assert learning_rate(opt, 1100, 100) == pytest.approx(1e-3)
    assert learning_rate(opt, 1100, 600) == pytest.approx(5e-4)  # half-way down the cosine
    assert learning_rate(opt, 1100, 1100) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(dict(lr=1e-3, warmup_steps=100), 50, 25) == pytest.approx(2.5e-4)
    assert learning_rate(opt, 50, 50) == pytest.approx(5e-4)  # warm-up only, no decay
    make_optimizer(lr=1e-3, total_steps=50, warmup_steps=100, schedule="cosine")  # builds
    with pytest.raises(UserError, match=r"unknown optim.schedule 'linear'"):
        make_optimizer(lr=1e-3, total_steps=50, schedule="linear")


def test_train_seconds_stops_early_as_if_last_and_a_rerun_goes_on(tmp_path):
    c = quick_config(total_steps=10_000, ckpt_every=10_000, log_every=10_000, sample_every=10_000)
    c.train_seconds = 1e-9
    train(c, str(tmp_path / "run"))  # the budget is spent after the first step
    assert Checkpoints(str(tmp_path / "run")).all_steps() == [1]
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1]
    assert (tmp_path / "run" / "samples.png").exists()  # the final grid, as for a last step
    c.update(total_steps=3, train_seconds=0.0)
    train(c, str(tmp_path / "run"))
    assert Checkpoints(str(tmp_path / "run")).all_steps() == [1, 3]


def test_writer_merges_writes_of_one_step_into_one_line(tmp_path):
    from core.writer import MetricWriter

    w = MetricWriter(str(tmp_path), tensorboard=False)
    w.write(1, {"loss": 1.0})
    w.write(2, {"loss": 0.5})
    w.write(2, {"eval/fid": 3.0})
    w.write(2, {"eval/kid": 0.1})
    w.write(3, {"loss": 0.25})
    assert read_metrics(tmp_path) == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.5, "eval/fid": 3.0, "eval/kid": 0.1},
        {"step": 3, "loss": 0.25},
    ]
    w.truncate_after(2)  # a resume from step 2
    w.write(3, {"loss": 0.2})
    w.write(3, {"eval/fid": 2.0})
    assert read_metrics(tmp_path)[1:] == [
        {"step": 2, "loss": 0.5, "eval/fid": 3.0, "eval/kid": 0.1},
        {"step": 3, "loss": 0.2, "eval/fid": 2.0},
    ]


def test_ema_warmup_decays_by_min_of_the_rate_and_one_plus_n_over_ten_plus_n():
    from flax import nnx

    import losses
    import models
    from core.train_state import init_state, make_optimizer
    from core.trainer import make_train_step

    net = models.build("mlp", dim=2, hidden=8, depth=1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net, nnx.Param)
    tx = make_optimizer(lr=1e-2, total_steps=100, schedule="constant")
    batch = {"x": jax.random.normal(jax.random.key(1), (16, 2))}
    for warmup, decays in ((True, [0.1, 2 / 11, 0.25]), (False, [0.99] * 3)):
        step = jax.jit(
            make_train_step(graphdef, losses.build("flow_matching"), tx, ema_decay=0.99, seed=0,
                            ema_warmup=warmup)
        )  # fmt: skip
        state = init_state(nnx.to_pure_dict(params), tx)
        for decay in decays:
            new, _ = step(state, batch)
            mix = lambda e, p, d=decay: d * e + (1 - d) * p
            want = jax.tree.map(mix, state.ema, new.params)
            for a, b in zip(jax.tree.leaves(new.ema), jax.tree.leaves(want)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
            state = new


def twin_config(**overrides):
    c = config_lib.load("experiments/shortcut/moons_mlp.py:smoke=True")
    c.loss.teacher = "teacher_ema"
    c.update(
        {**dict(teacher_ema_decay=0.5, ckpt_every=2, log_every=1, sample_every=0), **overrides}
    )
    return c


def test_teacher_ema_is_checkpointed_and_resumes_exactly_and_bad_uses_are_errors(tmp_path):
    import orbax.checkpoint as ocp

    straight, halves = str(tmp_path / "straight"), str(tmp_path / "halves")
    train(twin_config(total_steps=4), straight)
    train(twin_config(total_steps=2), halves)
    train(twin_config(total_steps=4), halves)  # resumes from step 2, teacher EMA included
    trees = {}
    for run in (straight, halves):
        ckpt = open_for_reading(run)
        assert sorted(os.listdir(os.path.join(ckpt.directory, "4"))) == sorted(
            ["_CHECKPOINT_METADATA", "commit_success.txt", "config", "ema", "files.json",
             "opt_state", "params", "teacher_ema"]
        )  # fmt: skip
        names = ("params", "teacher_ema", "ema")
        args = ocp.args.Composite(**{k: ocp.args.StandardRestore() for k in names})
        trees[run] = dict(ckpt._manager.restore(4, args=args))
        ckpt.close()
    for k in ("params", "teacher_ema", "ema"):
        for a, b in zip(jax.tree.leaves(trees[straight][k]), jax.tree.leaves(trees[halves][k])):
            np.testing.assert_array_equal(a, b, err_msg=k)
    differs = lambda a, b: any(
        not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    assert differs(trees[straight]["teacher_ema"], trees[straight]["ema"])
    # a run trained without the teacher EMA cannot grow one on resume
    train(config_lib.load("experiments/shortcut/moons_mlp.py:smoke=True"), str(tmp_path / "p"))
    before = (tmp_path / "p" / "config.json").read_text()
    with pytest.raises(UserError, match=r"checkpoint in .* has no 'teacher_ema'"):
        train(twin_config(total_steps=4), str(tmp_path / "p"))
    assert (tmp_path / "p" / "config.json").read_text() == before
    for bad, match in (
        (dict(teacher_ema_decay=1.0), r"teacher_ema_decay=1.0 must be in \[0, 1\)"),
        (dict(teacher_ema_decay=0.0), r"teacher='teacher_ema' needs a teacher EMA"),
    ):
        with pytest.raises(UserError, match=match):
            train(twin_config(total_steps=2, **bad), str(tmp_path / "bad"))
    plain = quick_config(total_steps=2, ckpt_every=2, log_every=1, sample_every=0)
    plain.teacher_ema_decay = 0.9
    with pytest.raises(UserError, match=r"loss 'flow_matching' takes none"):
        train(plain, str(tmp_path / "bad"))

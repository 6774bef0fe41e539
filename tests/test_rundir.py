"""Run directories a researcher can trust: damaged checkpoints fall back to the newest intact
step, one training per workdir, SIGTERM/SIGINT checkpoint the current step, a resume that
changes what was trained on is refused, each checkpoint keeps the config that trained it."""

import glob
import json
import os
import shutil
import signal
import subprocess
import textwrap

import jax
import numpy as np
import pytest

from core import config as config_lib
from core import runs, sharding
from core.checkpoint import Checkpoints
from core.errors import TrainingInterrupted, UserError
from core.workdir import LOCK_FILE, WorkdirLock
from tests.conftest import PYTHON, ROOT, train


def quick_config(**overrides):
    c = config_lib.load("experiments/quickstart.py:smoke=True")
    c.update(dict(ckpt_every=2, log_every=1, sample_every=0), **overrides)
    return c


def params_of(workdir, step=None, ema=False):
    experiment, _ = runs.load_run(str(workdir))
    mesh = sharding.make_mesh()
    _, params, step = runs.restore_network(str(workdir), experiment, mesh, step=step, ema=ema)
    return step, params


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def data_file(workdir, step, item):
    (path,) = glob.glob(os.path.join(workdir, "checkpoints", str(step), item, "d", "*"))
    return path


def read_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 6-step run without faults, checkpoints at 2, 4, 6 (the reference)."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    train(quick_config(total_steps=6), str(workdir))
    return workdir


def test_a_truncated_newest_checkpoint_falls_back_for_sampling_and_training(
    straight, tmp_path, capfd
):
    run = tmp_path / "run"
    train(quick_config(total_steps=4), str(run))
    with open(data_file(run, 4, "ema"), "r+b") as f:
        f.truncate(50)
    sampled = runs.sample_run(str(run), num=4, batch_size=4)
    assert sampled.step == 2 and np.isfinite(sampled.samples).all()
    err = capfd.readouterr().err
    assert "checkpoint step 4" in err and "is damaged" in err and "has 50 bytes" in err
    assert "using step 2" in err
    assert os.path.isdir(run / "checkpoints" / "4")  # reading never moves or deletes

    train(quick_config(total_steps=6), str(run))  # resumes from step 2, the intact one
    err = capfd.readouterr().err
    assert f"moved to {run / 'damaged_checkpoints' / '4'}" in err
    assert os.listdir(run / "damaged_checkpoints" / "4")  # kept, not deleted
    assert Checkpoints(str(run)).all_steps() == [2, 4, 6]
    assert_same(params_of(run)[1], params_of(straight)[1])  # as if nothing had happened
    assert read_steps(run) == list(range(1, 7))


def test_a_missing_metadata_file_or_ema_folder_is_damage_not_a_config_change(tmp_path, capfd):
    run = tmp_path / "run"
    train(quick_config(total_steps=4), str(run))
    os.remove(run / "checkpoints" / "4" / "params" / "_METADATA")
    step, _ = params_of(run)  # the raw weights: step 4's are damaged
    assert step == 2 and "params/_METADATA is missing" in capfd.readouterr().err
    assert params_of(run, ema=True)[0] == 4  # its EMA is intact
    shutil.rmtree(run / "checkpoints" / "4" / "ema")
    assert params_of(run, ema=True)[0] == 2
    assert "its ema/ folder is missing" in capfd.readouterr().err
    asked = r"no intact checkpoint in .*\(step 4: its ema/ folder is missing\)$"
    with pytest.raises(UserError, match=asked):
        params_of(run, step=4, ema=True)  # a step asked for by number is not replaced

    os.remove(run / "checkpoints" / "2" / "ema" / "_METADATA")
    with pytest.raises(UserError, match=r"no intact checkpoint in .*step 4: its ema/ folder is "
                       r"missing; step 2: ema/_METADATA is missing"):  # fmt: skip
        runs.sample_run(str(run), num=2, batch_size=2)
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]


def test_a_second_training_of_a_workdir_is_refused_and_a_killed_holder_frees_it(tmp_path):
    run = tmp_path / "run"
    train(quick_config(total_steps=2), str(run))
    before = open(run / "metrics.jsonl").read()
    with WorkdirLock(str(run)):
        with pytest.raises(UserError, match=rf"{run} is being trained by another process "
                           rf"\(pid {os.getpid()} on .*, since .*\); wait"):  # fmt: skip
            train(quick_config(total_steps=4), str(run))
        drawn = runs.sample_run(str(run), num=2, batch_size=2)  # reading needs no lock
        assert drawn.step == 2 and drawn.samples.shape == (2, 2)
    assert open(run / "metrics.jsonl").read() == before

    holder = subprocess.Popen(
        [PYTHON, "-c", "import sys, time; from core.workdir import WorkdirLock\n"
         f"with WorkdirLock({str(run)!r}):\n print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=rf"pid {holder.pid} "):
        with WorkdirLock(str(run)):
            pass
    holder.kill()  # SIGKILL: no clean-up runs
    holder.wait()
    with WorkdirLock(str(run)):  # the kernel dropped the dead holder's lock
        pass
    assert os.path.exists(run / LOCK_FILE)


INTERRUPT_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from core import config as config_lib
    from scripts.common import run
    from tests.conftest import train
    workdir, at, times = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    c = config_lib.load("experiments/quickstart.py:smoke=True")
    c.update(total_steps=8, ckpt_every=100, log_every=1, sample_every=0)
    def hook(step, state):
        if step == at:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)
    def main(argv):
        train(c, workdir, hooks=[hook])
    run(main)
""")


def test_sigterm_checkpoints_the_current_step_and_the_rerun_equals_an_uninterrupted_run(
    tmp_path, python_env
):
    go = lambda workdir, at, times=1: subprocess.run(
        [PYTHON, "-c", INTERRUPT_SCRIPT, str(workdir), str(at), str(times)],
        cwd=ROOT, env=python_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    straight = go(tmp_path / "straight", 0)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = go(tmp_path / "run", 3)  # the signal arrives during step 3's hooks
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: SIGTERM at step 4 of 8: checkpoint saved"), last
    assert "Traceback" not in stopped.stderr
    assert Checkpoints(str(tmp_path / "run")).all_steps() == [4]  # ckpt_every=100: none else
    resumed = go(tmp_path / "run", 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same(params_of(tmp_path / "run")[1], params_of(tmp_path / "straight")[1])
    assert read_steps(tmp_path / "run") == list(range(1, 9))  # each step once
    twice = go(tmp_path / "twice", 3, times=2)  # the second one stops at once, no checkpoint
    assert twice.returncode == -signal.SIGTERM, twice.stderr[-3000:]
    assert not os.path.isdir(tmp_path / "twice" / "checkpoints" / "4")


def test_sigint_stops_with_a_checkpoint_and_status_130(tmp_path):
    def hook(step, state):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    # Python's default, or SIG_IGN where the suite itself runs in the background (`cmd &`)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"SIGINT at step 3 of 6") as e:
        train(quick_config(total_steps=6, ckpt_every=100), str(run), hooks=[hook])
    assert e.value.status == 130
    assert Checkpoints(str(run)).all_steps() == [3]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    train(quick_config(total_steps=6, ckpt_every=100), str(run))
    # TensorBoard is told to purge what the first run logged after step 3
    first, second = (glob.glob(str(run / "tensorboard" / f"events.*.step{s}.*")) for s in (0, 3))
    assert len(first) == 1 and len(second) == 1  # the first run's file is kept
    starts = [e.step for e in tensorboard_events(second[0]) if e.HasField("session_log")]
    assert starts == [4]


def tensorboard_events(path):
    """The `Event` protos of a TensorBoard events file (TFRecord framing)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, out, i = open(path, "rb").read(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(Event.FromString(data[i + 12 : i + 12 + n]))
        i += 12 + n + 4
    return out


def test_a_resume_that_changes_the_data_is_refused_and_each_checkpoint_keeps_its_config(
    tmp_path, capfd
):
    run = tmp_path / "run"
    c = quick_config(total_steps=2)
    c.sample.num_steps = 3
    train(c, str(run))
    before = {n: open(run / n).read() for n in ("config.json", "metrics.jsonl")}
    other = quick_config(total_steps=4)
    other.data.name = "checkerboard"
    with pytest.raises(UserError, match=r"would change what it was trained on \(data.name "
                       r"moons -> checkerboard\).*--allow-changes"):  # fmt: skip
        train(other, str(run))
    assert {n: open(run / n).read() for n in before} == before
    assert Checkpoints(str(run)).all_steps() == [2]

    longer = quick_config(total_steps=4)
    longer.sample.num_steps = 5  # not what it was trained on: allowed, listed
    train(longer, str(run))
    assert "with config changes: sample.num_steps 3 -> 5, total_steps 2 -> 4" in (
        capfd.readouterr().err
    )
    assert runs.load_run(str(run), 2)[0].sampling.num_steps == 3  # the step's own config
    assert runs.load_run(str(run), 4)[0].sampling.num_steps == 5
    assert runs.sample_run(str(run), step=2).experiment.sampling.num_steps == 3

    other.total_steps = 6
    train(other, str(run), allow_changes=True)  # asked for: goes on, and says so
    assert "data.name moons -> checkerboard" in capfd.readouterr().err
    assert json.load(open(run / "config.json"))["data"]["name"] == "checkerboard"
    train(other, str(run), allow_changes=True)  # finished: says so, writes nothing
    assert "already at step 6 (total_steps=6): nothing to train" in capfd.readouterr().err


def test_an_unwritable_workdir_is_one_line_before_anything_is_written(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError, match=r"cannot write to workdir .*file/run: Not a directory"):
        train(quick_config(total_steps=2), str(tmp_path / "file" / "run"))


def test_the_two_spellings_of_the_guidance_weight_are_not_a_change():
    """`sample.cfg_scale` (what presets set) and `sample.guidance.scale` name one weight:
    the same weight spelt either way is no change; a different weight is one."""
    from core.trainer import config_changes

    old = {"sample": {"cfg_scale": 1.5, "guidance": {"scale": None, "schedule": "constant"}}}
    same = {"sample": {"guidance": {"scale": 1.5, "schedule": "constant"}}}
    both = {"sample": {"cfg_scale": 1.5, "guidance": {"scale": 1.5, "schedule": "constant"}}}
    assert config_changes(old, same) == [] and config_changes(old, both) == []
    assert config_changes(same, old) == []
    other = {"sample": {"guidance": {"scale": 4.0, "schedule": "interval"}}}
    assert config_changes(old, other) == [
        ("sample.guidance.scale", 1.5, 4.0),
        ("sample.guidance.schedule", "constant", "interval"),
    ]

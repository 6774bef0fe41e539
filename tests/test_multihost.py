"""Two CPU processes joined by `jax.distributed` (gloo collectives), each reading its half
of every batch, train exactly like one process with two devices."""

import json
import os
import socket
import subprocess

import numpy as np

from tests.conftest import PYTHON, ROOT, run_python

ARGS = [
    "-m",
    "scripts.train",
    "--config",
    "experiments/quickstart.py:smoke=True",
    "--config.total_steps=3",
    "--config.batch_size=16",
    "--config.ckpt_every=3",
    "--config.train_seconds=1e6",  # never spent, but the processes agree on it every step
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def launch_pair(workdir, python_env, *extra) -> list[subprocess.Popen]:
    """`scripts.train` as two processes joined by `jax.distributed` on a free port."""
    port = free_port()
    procs = []
    for i in range(2):
        env = dict(
            python_env,
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        procs.append(
            subprocess.Popen(
                [PYTHON, *ARGS, "--workdir", str(workdir), *extra],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def finish(procs) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]


def test_two_processes_equal_one_process_with_two_devices(tmp_path, python_env):
    procs = launch_pair(tmp_path / "multi", python_env)
    single = run_python([*ARGS, "--workdir", str(tmp_path / "single")], python_env, devices=2)
    assert single.returncode == 0, single.stderr[-2000:]
    finish(procs)
    multi, one = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert len(multi) == 3
    np.testing.assert_allclose(multi, one, rtol=1e-6)
    assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "3")
    # a spent wall-clock budget: process 0's clock decides, both stop after the first step
    # together (a disagreement would leave one process waiting in a collective)
    finish(launch_pair(tmp_path / "budget", python_env, "--config.train_seconds=1e-9"))
    assert len(losses(tmp_path / "budget")) == 1
    assert os.path.isdir(tmp_path / "budget" / "checkpoints" / "1")


def test_sigterm_to_one_process_checkpoints_both_at_one_step_and_both_exit_interrupted(
    tmp_path, python_env
):
    """JAX's preemption notice (jax.distributed catches SIGTERM) makes every process stop at
    the same step, after one checkpoint of it, with status 143."""
    import signal
    import time

    workdir = tmp_path / "run"
    procs = launch_pair(
        workdir, python_env, "--config.total_steps=100000", "--config.ckpt_every=100000",
        "--config.log_every=1",
    )  # fmt: skip
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # only the second process is told
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert "interrupted: preemption at step" in err and "Traceback" not in err
    steps = os.listdir(workdir / "checkpoints")
    assert len(steps) == 1 and 2 <= int(steps[0]) < 100000

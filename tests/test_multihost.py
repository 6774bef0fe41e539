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
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_two_processes_equal_one_process_with_two_devices(tmp_path, python_env):
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
                [PYTHON, *ARGS, "--workdir", str(tmp_path / "multi")],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    single = run_python([*ARGS, "--workdir", str(tmp_path / "single")], python_env, devices=2)
    assert single.returncode == 0, single.stderr[-2000:]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    multi, one = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert len(multi) == 3
    np.testing.assert_allclose(multi, one, rtol=1e-6)
    assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "3")

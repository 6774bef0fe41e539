"""The benchmark: analytic FLOPs of real configs, and the CLI's JSON line."""

import json
import subprocess

from core import config as config_lib
from core.benchmark import forward_flops, mfu
from core.experiment import Experiment
from models.flops import dit_forward_flops
from tests.conftest import PYTHON, ROOT


def test_forward_flops_of_the_dit_config_equal_the_closed_form():
    for size in ("S/2", "B/2"):
        config = config_lib.load(f"experiments/flow_matching/cifar10_dit.py:size={size}")
        flops = forward_flops(Experiment.from_config(config), (32, 32, 3))
        assert flops == dit_forward_flops(size, 32, 3)
    # DiT-B/2 on 32x32x3: about 46 GFLOP per forward (2 * 130M params * 256 tokens / 1.45)
    assert 45e9 < dit_forward_flops("B/2", 32, 3) < 47e9


def test_forward_flops_count_the_step_size_input_of_a_shortcut_dit():
    # the shortcut DiT is the flow-matching DiT plus a dt embedder: a 256 -> 384 -> 384 MLP
    shortcut = config_lib.load("experiments/shortcut/mnist_dit.py")
    baseline = config_lib.load("experiments/shortcut/mnist_dit.py:method=fm")
    hidden = 384  # DiT-S
    flops = lambda config: forward_flops(Experiment.from_config(config), (28, 28, 1))
    extra = flops(shortcut) - flops(baseline)
    assert extra == 2 * (256 * hidden + hidden * hidden)


def test_forward_flops_of_a_flow_count_its_forward_pass():
    # TarFlow on MNIST: per block, proj_in, then per layer qkv + out projection + MLP per
    # token ((4 + 2r) W² MACs) and causal attention computed in full (2 T² W), then proj_out
    config = config_lib.load("experiments/nf/mnist_tarflow.py")
    m = config.model
    tokens, token_dim, w = (28 // m.patch) ** 2, m.patch**2, m.width
    ratio = m.get("mlp_ratio", 4)  # the TarFlow default
    per_layer = tokens * (4 + 2 * ratio) * w * w + 2 * tokens * tokens * w
    per_block = tokens * token_dim * w + m.layers_per_block * per_layer + tokens * w * 2 * token_dim
    flops = forward_flops(Experiment.from_config(config), (28, 28, 1))
    assert flops == 2 * m.num_blocks * per_block


def test_mfu_arithmetic():
    out = mfu(forward=10**9, images_per_sec=1000.0, peak_tflops=6.0)
    assert out["train_tflops"] == 3.0 and out["mfu"] == 0.5


def test_bench_cli_prints_one_json_line(python_env, tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "scripts.bench",
            "--config",
            "experiments/quickstart.py:smoke=True",
            "--shape",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--sample-steps",
            "2",
            "--sample-repeats",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=python_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text().strip())
    assert row["images_per_sec"] > 0 and row["sample_images_per_sec"] > 0
    assert row["forward_gflops_per_image"] > 0 and 0 < row["mfu"] < 1


def test_the_cpu_sized_shortcut_dit_is_the_size_its_docstring_states():
    # mnist_dit.py:cpu=True: width 128, depth 4, patch 4 (49 tokens), float32, 83 MFLOP
    config = config_lib.load("experiments/shortcut/mnist_dit.py:cpu=True")
    assert config.compute_dtype == "float32"
    expected = dit_forward_flops("S/4", 28, 1, use_dt=True, hidden=128, depth=4, patch=4)
    assert forward_flops(Experiment.from_config(config), (28, 28, 1)) == expected
    assert 83e6 < expected < 84e6

"""The classifier family (`models/classifier.py`, `losses/classification.py`, the `classifier`
entry of `core.methods.METHODS`): its network and loss, a tiny run trained by the trainer on
a separable synthetic image task, its held-out `accuracy` through `scripts.evaluate`, the
`classifier` verifier of noise search on that run, and that a classifier generates nothing.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

import models
from core import config as config_lib
from core import runs, sharding
from core.errors import UserError
from core.evaluation import Evaluator, RunNetwork
from core.experiment import Experiment
from core.generation import Generation
from core.methods import METHODS
from losses.classification import loss_cross_entropy
from metrics.classifier_verifier import class_log_prob, classifier
from metrics.verifiers import VerifierContext
from models.classifier import Classifier
from tests.conftest import ROOT, train

CONFIG = os.path.join(ROOT, "experiments/classifier/mnist_cnn.py")
SIZE, CLASSES = 8, 3
jit0 = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def bars(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images `[n, 8, 8, 1]` of three classes on a dim noisy background: a bright
    horizontal bar (0), a vertical bar (1) or a 2x2 square (2), at a random place."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, SIZE, SIZE, 1)).astype(np.uint8)
    y = np.arange(n) % CLASSES
    for i, label in enumerate(y):
        r, c = rng.integers(1, SIZE - 2, 2)
        if label == 0:
            x[i, r, 1:-1] = 255
        elif label == 1:
            x[i, 1:-1, c] = 255
        else:
            x[i, r : r + 2, c : c + 2] = 255
    return x, y.astype(np.int32)


def tiny_config(directory: str) -> ConfigDict:
    """The MNIST config at smoke size, on the bars task (npz files), 150 steps."""
    c = config_lib.load(f"{CONFIG}:smoke=True")
    c.data.update(name="npz", split="train", path=os.path.join(directory, "bars_{split}.npz"))
    c.model.update(num_classes=CLASSES, image_size=SIZE, width=8)
    c.update(total_steps=150, batch_size=32, ckpt_every=150, log_every=50, ema_decay=0.9)
    c.optim.update(lr=3e-3, warmup_steps=10)
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, workdir) of the tiny classifier run, and its test split (x in [-1, 1], y)."""
    directory = str(tmp_path_factory.mktemp("bars"))
    for split, n, seed in (("train", 600, 0), ("test", 150, 1)):
        x, y = bars(n, seed)
        np.savez(os.path.join(directory, f"bars_{split}.npz"), x=x, y=y)
    config = tiny_config(directory)
    workdir = os.path.join(directory, "run")
    train(config, workdir)
    x, y = bars(150, 1)
    return config, workdir, x.astype(np.float32) / 127.5 - 1.0, y


def test_network_and_loss_contract():
    net = models.build("classifier", rngs=nnx.Rngs(0), in_channels=1, num_classes=CLASSES,
                       width=4, image_size=SIZE)  # fmt: skip
    assert isinstance(net, Classifier)
    graphdef, params = nnx.split(net, nnx.Param)
    assert not jax.tree.leaves(nnx.split(net, nnx.Param, ...)[2])  # nnx.Param only
    x = jnp.asarray(bars(6, 0)[0], jnp.float32) / 127.5 - 1.0
    batch = {"x": x, "cond": jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)}

    def objective(p, smoothing):
        per_example, metrics = loss_cross_entropy(
            nnx.merge(graphdef, p), batch, jax.random.key(0), label_smoothing=smoothing
        )
        return jnp.mean(per_example), (per_example, metrics)

    grad = jit0(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
    (value, (per_example, metrics)), grads = grad(params, 0.0)
    assert per_example.shape == (6,) and bool(jnp.isfinite(per_example).all())
    assert net(x).shape == (6, CLASSES) and net(x).dtype == jnp.float32
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    logits = net(x)  # the loss is the cross-entropy of the labels
    expected = -jax.nn.log_softmax(logits)[jnp.arange(6), batch["cond"]]
    np.testing.assert_allclose(per_example, expected, rtol=1e-5, atol=1e-6)
    (smoothed, _), _ = grad(params, 0.1)
    assert float(smoothed) != float(value)
    with pytest.raises(UserError, match="use_labels"):
        loss_cross_entropy(net, {"x": x}, jax.random.key(0))
    with pytest.raises(ValueError, match="expects images"):
        net(jnp.zeros((2, SIZE, SIZE, 3)))
    with pytest.raises(UserError, match="num_classes >= 2"):
        models.build("classifier", rngs=nnx.Rngs(0), num_classes=1)


def test_a_tiny_run_learns_and_scripts_evaluate_reports_its_accuracy(run, tmp_path):
    from scripts import evaluate

    config, workdir, _, _ = run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows[-1]["step"] == 150 and rows[-1]["accuracy"] > 0.9
    assert not os.path.exists(os.path.join(workdir, "samples.png"))  # draws no samples
    out = str(tmp_path / "eval.json")
    evaluate.main(["evaluate", "--workdir", workdir, "--metrics", "accuracy", "--split", "test",
                   "--batch", "64", "--out", out])  # fmt: skip
    with open(out) as f:
        result = json.load(f)
    assert result["accuracy"] >= 0.95, result
    assert (result["accuracy_split"], result["accuracy_count"]) == ("test", 150)
    assert result["weights"] == "ema" and "sampler" not in result  # nothing was sampled


def test_accuracy_of_a_run_that_is_not_a_classifier_is_a_user_error():
    experiment = Experiment.from_config(config_lib.load(f"{ROOT}/experiments/quickstart.py"))
    graphdef, _ = experiment.network.abstract()
    ev = Evaluator(None, network=RunNetwork(graphdef, None, experiment))
    with pytest.raises(UserError, match="classifier's metric.*flow_matching"):
        ev.run(["accuracy"])


def _verifier_context(config, workdir) -> VerifierContext:
    """The context a search gives: the frozen network `verifier` restored from the run."""
    config = ConfigDict(config.to_dict())
    config.frozen.verifier = ConfigDict({"workdir": workdir})
    experiment = Experiment.from_config(config)
    frozen = runs.restore_frozen(experiment, sharding.make_mesh())
    return VerifierContext(experiment=experiment, frozen=frozen)


def test_the_verifier_scores_the_requested_class_highest(run):
    config, workdir, x, y = run
    verifier = classifier(_verifier_context(config, workdir))
    assert (verifier.name, verifier.nfe) == ("classifier", 1)
    score = jit0(verifier.fn)
    by_class = np.stack(
        [score(verifier.params, x, jnp.full((len(x),), c, jnp.int32), None) for c in range(3)],
        axis=1,
    )
    assert np.all(by_class <= 0) and np.all(np.isfinite(by_class))
    np.testing.assert_allclose(np.exp(by_class).sum(1), 1.0, rtol=1e-4)  # log p(c | x)
    assert np.mean(np.argmax(by_class, axis=1) == y) >= 0.95
    own = np.asarray(score(verifier.params, x, jnp.asarray(y), None))
    np.testing.assert_allclose(own, by_class[np.arange(len(y)), y], rtol=1e-5, atol=1e-6)
    # unconditional samples, and a label that is no class (the guidance null): the best class
    best = by_class.max(axis=1)
    np.testing.assert_allclose(score(verifier.params, x, None, None), best, rtol=1e-5, atol=1e-6)
    null = jnp.full((len(x),), CLASSES, jnp.int32)
    np.testing.assert_allclose(score(verifier.params, x, null, None), best, rtol=1e-5, atol=1e-6)
    # samples are clipped to the classifier's range [-1, 1]
    np.testing.assert_array_equal(
        verifier(np.clip(x * 3.0, -1, 1), jnp.asarray(y)), verifier(x * 3.0, jnp.asarray(y))
    )
    with pytest.raises(UserError, match="class labels"):
        verifier(x, jnp.zeros((len(x), 4)))


def test_the_verifier_needs_a_classifier_run():
    experiment = Experiment.from_config(config_lib.load(f"{CONFIG}:smoke=True"))
    for frozen in (None, runs.NO_FROZEN):
        with pytest.raises(UserError, match="frozen.verifier.workdir"):
            classifier(VerifierContext(experiment=experiment, frozen=frozen))
    mlp = models.build("mlp", rngs=nnx.Rngs(0), dim=2, hidden=8, depth=1)
    graphdef, params = nnx.split(mlp, nnx.Param)
    frozen = runs.FrozenNets({"verifier": graphdef}, {"verifier": nnx.to_pure_dict(params)})
    with pytest.raises(UserError, match="not a classifier"):
        classifier(VerifierContext(experiment=experiment, frozen=frozen))


def test_class_log_prob():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    log_p = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(class_log_prob(logits, jnp.array([2, 0])), log_p[[0, 1], [2, 0]])
    np.testing.assert_allclose(class_log_prob(logits, None), log_p.max(1))
    np.testing.assert_allclose(class_log_prob(logits, jnp.array([-1, 7])), log_p.max(1))


def test_a_classifier_generates_nothing():
    method = METHODS["classifier"]
    assert not method.generates and method.sampler is None and method.prior is None
    # GIVT's stage-1 VAE is the other family that only serves another (its decoder)
    assert {name for name, m in METHODS.items() if not m.generates} == {"classifier", "vae"}
    config = config_lib.load(f"{CONFIG}:smoke=True")
    experiment = Experiment.from_config(config)
    assert experiment.method is method and experiment.sampling.sampler is None
    graphdef, _ = experiment.network.abstract()
    with pytest.raises(UserError, match="a classifier model does not generate samples"):
        Generation(experiment, graphdef, (28, 28, 1))
    with pytest.raises(UserError, match="does not generate samples"):
        method.check_sampler("heun")
    named = config_lib.load(f"{CONFIG}:smoke=True")
    named.sample.sampler = "heun"
    with pytest.raises(UserError, match="does not generate samples: leave sample.sampler"):
        Experiment.from_config(named)
    evaluated = config_lib.load(f"{CONFIG}:smoke=True")
    evaluated.eval_every = 10
    with pytest.raises(UserError, match="set eval_every=0"):
        Experiment.from_config(evaluated)


def test_classify_cli_judges_samples_by_their_labels(run, tmp_path, python_env):
    """`scripts.classify`: real images with their labels are right, with shuffled labels
    about a third right (3 classes); the uint8 ADM layout is read as the float images."""
    from core.plots import to_uint8
    from tests.conftest import run_python

    _, workdir, x, y = run
    for name, labels in (("true", y), ("shuffled", np.roll(y, 1))):
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, arr_0=to_uint8(x), arr_1=labels)
        out = str(tmp_path / f"{name}.json")
        argv = ["-m", "scripts.classify", "--samples", path, "--classifier-run", workdir]
        proc = run_python([*argv, "--out", out], python_env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    true = json.loads((tmp_path / "true.json").read_text())
    shuffled = json.loads((tmp_path / "shuffled.json").read_text())
    assert true["accuracy"] >= 0.95 and shuffled["accuracy"] < 0.6
    assert true["mean_log_p"] > shuffled["mean_log_p"]

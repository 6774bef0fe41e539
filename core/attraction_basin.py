"""The attraction-basin experiment (arXiv 2411.16738, issue 32) at CPU size.

A class-conditional flow-matching model is trained on a few MNIST images per class (so
that guidance inside the attraction basin pulls samples onto training images), then
sampled from the same noise and labels under each guidance schedule (w = 1, constant,
interval, dynamic; `samplers.guidance`), and each set is measured side by side:

- memorized / spurious / generalized fractions in pixel space against the training images
  (`metrics.memorization.memorization_report`, its default near-identical threshold);
- FID against MNIST test images (`metrics.fid`, the reference statistics cached);
- class accuracy of a classifier run (`metrics.classifier_verifier.classify_samples`),
  where one is given;
- the gap `||v_cond − v_null||` along every trajectory and the dynamic switch time per
  sample (`core.generation.guidance_trace`), plotted.

`prepare_data` writes the training subset as an npz (`x`, `y`), `train_config` is the
experiment config of the generator, `measure` runs the schedules and returns a JSON-ready
dict; `plot_gaps` draws the curves. `scripts/attraction_basin.py` is the CLI.
"""

import os
import time

import numpy as np

from core.errors import UserError


def prepare_data(path: str, per_class: int, *, data_dir: str | None = None) -> dict:
    """The first `per_class` training images of each MNIST class, as `x` (uint8
    `[10 per_class, 28, 28, 1]`) and `y` in an npz at `path`; returns `{"x", "y"}`."""
    import data

    options = {"data_dir": data_dir} if data_dir else {}
    source = data.build_source("mnist", split="train", use_labels=True, **options)
    # a prefix long enough to hold `per_class` images of every class (MNIST is balanced)
    batch = source.__getitems__(np.arange(min(source.num_examples, 1000 + 200 * per_class)))
    from core import plots

    x, y = plots.to_uint8(np.asarray(batch["x"])), np.asarray(batch["cond"])
    rows = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    if len(rows) != 10 * per_class:
        raise UserError(f"MNIST train has fewer than {per_class} images of some class")
    subset = {"x": x[rows], "y": y[rows].astype(np.int64)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **subset)
    return subset


def train_config(data_path: str, *, steps: int, batch: int, lr: float, seed: int = 0):
    """The generator: the smoke U-Net of `flow_matching/mnist_unet.py:cond=True` (label
    dropout 0.1) in float32 on the npz of `prepare_data`, trained `steps` steps."""
    from experiments.flow_matching.mnist_unet import get_config

    c = get_config("cond=True,smoke=True")
    c.data.update(name="npz", path=data_path, split="train", use_labels=True)
    c.update(total_steps=steps, batch_size=batch, seed=seed, ema_decay=0.999)
    c.update(log_every=max(1, steps // 20), ckpt_every=steps, sample_every=0)
    c.optim.update(lr=lr, warmup_steps=min(100, steps // 10))
    c.sample.update(sampler="heun", num_steps=32)
    return c


def train(workdir: str, per_class: int, *, steps: int, batch: int, lr: float,
          seed: int = 0, data_dir: str | None = None) -> dict:  # fmt: skip
    """Prepare the data and train the generator in `workdir` (resumed if there); returns
    `{"data", "train_seconds"}`."""
    from core.experiment import Experiment
    from core.trainer import train as train_experiment

    data_path = os.path.join(workdir, "train_subset.npz")
    if not os.path.exists(data_path):
        prepare_data(data_path, per_class, data_dir=data_dir)
    config = train_config(data_path, steps=steps, batch=batch, lr=lr, seed=seed)
    start = time.perf_counter()
    train_experiment(Experiment.from_config(config), os.path.join(workdir, "run"))
    return {"data": data_path, "train_seconds": time.perf_counter() - start}


def schedules(scale: float, interval: tuple[float, float]) -> dict[str, dict]:
    """The compared guidance settings: name -> `Sampling.but` keywords."""
    lo, hi = interval
    return {
        "w=1": dict(cfg_scale=1.0, cfg_schedule="constant"),
        "constant": dict(cfg_scale=scale, cfg_schedule="constant"),
        "interval": dict(cfg_scale=scale, cfg_schedule="interval", cfg_interval=(lo, hi)),
        "dynamic": dict(cfg_scale=scale, cfg_schedule="dynamic"),
    }


def draw(experiment, graphdef, params, spec: dict, *, num: int, batch: int, seed: int):
    """`(samples [num, ...] float32, labels, trace)` of `experiment`'s ODE sampler with its
    guidance trace (`core.generation.guidance_trace`), in batches, from `key(seed)`: the
    same noise and labels (classes cycled) for every guidance setting."""
    import jax

    from core.experiment import sample_labels
    from core.generation import Generation, guidance_trace

    gen = Generation(experiment, graphdef, spec["example_shape"])
    fn = jax.jit(lambda p, noise, cond: guidance_trace(experiment, graphdef, p, noise, cond))
    xs, traces = [], []
    labels = np.asarray(sample_labels(num, spec["num_classes"]))
    for i, start in enumerate(range(0, num, batch)):
        n = min(batch, num - start)
        noise = gen.draw_noise(jax.random.fold_in(jax.random.key(seed), i), n)
        x, trace = fn(params, noise, jax.numpy.asarray(labels[start : start + n]))
        xs.append(np.asarray(x))
        traces.append(jax.tree.map(np.asarray, trace))
    trace = {
        "t": traces[0]["t"],
        **{k: np.concatenate([tr[k] for tr in traces], axis=1) for k in ("gap", "weight")},
        **{k: np.concatenate([tr[k] for tr in traces]) for k in ("switch_step", "switch_t")},
    }
    return np.concatenate(xs), labels, trace


def measure(workdir: str, *, scale: float, interval: tuple[float, float], num: int,
            batch: int, seed: int = 0, classifier: str | None = None,
            fid_split: str = "test", data_dir: str | None = None) -> dict:  # fmt: skip
    """Sample the trained generator of `workdir` under each of `schedules(scale, interval)`
    and measure memorization (pixel space, against the training subset), FID against MNIST
    `fid_split` and, with a `classifier` run, class accuracy -> a JSON-ready dict (with the
    per-schedule mean gap curve and switch times) and the traces for `plot_gaps`."""
    from core import plots, reference, runs, sharding
    from metrics import fid as fm
    from metrics import memorization as mem

    run = os.path.join(workdir, "run")
    experiment, spec = runs.load_run(run)
    graphdef, params, step = runs.restore_network(run, experiment, sharding.make_mesh())
    train_x = np.load(os.path.join(workdir, "train_subset.npz"))["x"]
    options = {"data_dir": data_dir} if data_dir else {}
    test = reference.dataset_from_name("mnist", fid_split, **options)
    ref_mu, ref_sigma = test.stats(fm.inception_features)  # cached on disk per split
    out = {"step": int(step), "num": num, "seed": seed, "train_images": int(len(train_x)),
           "scale": scale, "interval": list(interval), "schedules": {}}  # fmt: skip
    traces = {}
    for name, kw in schedules(scale, interval).items():
        exp = experiment.with_sampling(**kw)
        start = time.perf_counter()
        x, labels, trace = draw(exp, graphdef, params, spec, num=num, batch=batch, seed=seed)
        seconds = time.perf_counter() - start
        images = plots.to_uint8(x)
        row = {"guidance": exp.sampling.guidance.record(), "sampler": exp.sampling.sampler,
               "sampling_steps": exp.sampling.num_steps, "sample_seconds": seconds}  # fmt: skip
        report = mem.memorization_report(
            mem.pixel_vectors(images), train_x, space="pixel", train_transform=mem.pixel_vectors
        )
        row.update({k.removeprefix("pixel/"): v for k, v in report.items()})
        row["fid"] = fm.fid_from_stats(*fm.stats(fm.inception_features(images)), ref_mu, ref_sigma)
        if classifier:
            from metrics.classifier_verifier import classify_samples

            row["class_accuracy"] = classify_samples(classifier, x, labels)["accuracy"]
        switched = trace["switch_step"] < exp.sampling.num_steps
        row["switched"] = float(switched.mean())
        row["switch_t_median"] = (
            float(np.median(trace["switch_t"][switched])) if switched.any() else None
        )
        row["gap_mean"] = [float(v) for v in trace["gap"].mean(axis=1)]
        out["schedules"][name] = row
        traces[name] = {**trace, "images": images[:20]}
    out["t"] = [float(v) for v in traces["w=1"]["t"]]
    out["fid_reference"] = f"mnist:{fid_split}"
    return out, traces


def plot_gaps(traces: dict, path: str, *, per_schedule: int = 24) -> str:
    """Gap `||v_cond − v_null||` against t: `per_schedule` trajectories (thin) and the mean
    (thick) of each schedule, with the dynamic schedule's switch times marked; and the
    histogram of those switch times. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(traces, ("C0", "C1", "C2", "C3", "C4")))
    for name, tr in traces.items():
        t, gap = tr["t"], tr["gap"]
        ax.plot(t, gap[:, :per_schedule], color=colors[name], alpha=0.15, lw=0.8)
        ax.plot(t, gap.mean(axis=1), color=colors[name], lw=2.5, label=f"{name} (mean)")
    dyn = traces.get("dynamic")
    if dyn is not None:
        steps = len(dyn["t"])
        cols = np.flatnonzero(dyn["switch_step"][:per_schedule] < steps)
        ax.scatter(
            dyn["switch_t"][cols], dyn["gap"][dyn["switch_step"][cols], cols],
            color=colors["dynamic"], marker="x", zorder=3, label="dynamic: switch",
        )  # fmt: skip
        switched = dyn["switch_t"][dyn["switch_step"] < steps]
        hist.hist(switched, bins=np.linspace(0, 1, 33), color=colors["dynamic"])
        hist.set_title(f"dynamic: switch time per sample ({len(switched)} of "
                       f"{len(dyn['switch_step'])} switched)")  # fmt: skip
    hist.set_xlabel("t (0 noise, 1 data)")
    ax.set_xlabel("t (0 noise, 1 data)")
    ax.set_ylabel("||v_cond - v_null||")
    ax.set_title("gap between conditional and unconditional velocity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

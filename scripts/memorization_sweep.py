r"""Memorization against training-set size: train the same model on MNIST `train[:K]` for
each K of a grid and several seeds, sample, and split the samples into memorized / spurious
/ generalized (Pham et al. 2025; `metrics.memorization`), plus the distance-ratio test; the
fractions' mean and standard deviation over seeds per K, and the three capacities
(`metrics.memorization.capacities`) read off the means.

  # the real run (one GPU): MNIST U-Net, the same number of steps for every K
  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.memorization_sweep \
      --workdir runs/mem_sweep --out docs/memorization_vs_K
  # a CPU-sized check of the whole pipeline (smoke U-Net, few steps, few samples)
  python -m scripts.memorization_sweep --tiny --workdir /tmp/mem_sweep --out /tmp/mem_vs_K
  # the CPU sweep: an MLP on pixels, K from 2 to 2048, two seeds per K
  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.memorization_sweep --mlp \
      --workdir runs/mem_mlp --out docs/memorization_vs_K_mlp

Thresholds: by default calibrated on the data (`--deltas calibrated`,
`metrics.memorization.calibrate_deltas`): delta_m is the 0.1 % quantile of `--calibrate-num`
held-out (test) images' distances to their nearest image of the whole training split, so a
new digit counts as memorized with probability 0.001 for every K (train[:K] is a subset:
its distances are larger); delta_s the 0.1 % quantile of held-out images' distances to
their nearest other held-out image. `--deltas default` takes `metrics.memorization.DELTAS`.

Without tensorflow-datasets, `--data-path data/mnist_{split}.npz` (`scripts.export_npz`).

The model and its training settings are the experiment config
`experiments/memorization/mnist_unet_sweep.py` (variant `k=<K>`, `tiny=True`, `data_path`,
`seed`); `--steps`, `--batch`, `--lr`, `--warmup`, `--ema` and `--sample-steps` override
its defaults. `--ks` and `--num` are the sweep's own.

Writes `<out>.json` (settings, the thresholds and how they were measured, per K and seed
the fractions and distance statistics, per K their mean and standard deviation, the
capacities) and `<out>.png` (fractions against K with error bars). Each (K, seed) trains in
`<workdir>/K<K>` (seed 0) or `<workdir>/K<K>_s<seed>`, and resumes there.
"""

import argparse
import json
import os
import time

import numpy as np

from scripts.common import argument_parser, run

# the model and its training settings (those of --tiny too): the experiment config
CONFIG = "experiments/memorization/mnist_unet_sweep.py"
# the sweep: training-set sizes and samples per K
FULL = dict(ks="4,16,64,256,1024,4096,16384", num=1024, seeds="0")  # 70k steps: 30 GPU minutes
TINY = dict(ks="4,32,256,2048", num=64, seeds="0")
MLP = dict(ks="2,8,32,128,512,2048", num=128, seeds="0,1")
# flags that override the config's training settings: its variant keys of the same names
TRAINING = ("steps", "batch", "lr", "warmup", "ema", "sample_steps")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("memorization_sweep", __doc__)
    p.add_argument("--workdir", required=True, help="one run directory per K inside")
    p.add_argument("--out", required=True, help="output prefix: <out>.json, <out>.png")
    p.add_argument("--tiny", action="store_true", help="CPU-sized settings (smoke U-Net)")
    p.add_argument("--mlp", action="store_true", help="the dense CPU sweep (MLP on pixels)")
    p.add_argument("--ks", help="training-set sizes, comma list")
    p.add_argument("--seeds", help="training and sampling seeds per K, comma list")
    p.add_argument("--deltas", choices=("calibrated", "default"), default="calibrated",
                   help="thresholds: measured on the data, or metrics.memorization.DELTAS")
    p.add_argument("--calibrate-num", type=int, default=2000,
                   help="held-out images for the calibration")  # fmt: skip
    p.add_argument("--steps", type=int, help="training steps for every K")
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--num", type=int, help="generated samples per K")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--ema", type=float, help="EMA decay")
    p.add_argument("--sample-steps", type=int, help="Heun steps for sampling")
    p.add_argument(
        "--data-path", default=None, help="MNIST as .npz files (mnist_{split}.npz) instead of tfds"
    )
    args = p.parse_args(argv[1:])
    from core.errors import UserError

    if args.tiny and args.mlp:
        raise UserError("--tiny and --mlp are two different presets: pick one")
    for key, value in (TINY if args.tiny else MLP if args.mlp else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.variant = variant(args)
    return args


def variant(args) -> str:
    """The config variant of the flags, but K: `tiny`, `data_path`, `seed` and the explicit
    training settings (unset ones are the config's defaults)."""
    from core.errors import UserError

    items = {"tiny": True} if args.tiny else {"mlp": True} if args.mlp else {}
    if args.data_path:
        if "," in args.data_path:
            raise UserError(f"--data-path={args.data_path!r}: a comma cannot pass in a variant")
        items["data_path"] = args.data_path
    items.update({key: getattr(args, key) for key in TRAINING if getattr(args, key) is not None})
    return ",".join(f"{key}={value}" for key, value in items.items())


def make_config(args, k: int, seed: int = 0):
    """The sweep's experiment config on `train[:k]`, with the flags' training settings."""
    from core import config as config_lib

    return config_lib.load(f"{CONFIG}:k={k},seed={seed},{args.variant}".rstrip(","))


def resolve_settings(args, config) -> None:
    """The training settings the config gives (flag or default) into `args`, for the JSON."""
    args.steps, args.batch = config.total_steps, config.batch_size
    args.lr, args.warmup = config.optim.lr, config.optim.warmup_steps
    args.ema, args.sample_steps = config.ema_decay, config.sample.num_steps


def run_one(args, k: int, seed: int, deltas: dict) -> dict:
    """Train (or resume) on `train[:k]` with `seed`, sample `args.num`, and measure
    memorization with the thresholds `deltas`."""

    from core import reference, sampling, sharding, trainer
    from core.experiment import Experiment, read_data_spec
    from metrics import memorization as mem

    experiment = Experiment.from_config(make_config(args, k, seed))
    workdir = os.path.join(args.workdir, f"K{k}" if seed == 0 else f"K{k}_s{seed}")
    t0 = time.perf_counter()
    state = trainer.train(experiment, workdir)
    train_s = time.perf_counter() - t0
    mesh = experiment.mesh.make()
    graphdef, _ = experiment.network.abstract()
    batch = sharding.sample_batch(mesh, 256, args.num)
    spec = read_data_spec(workdir)
    x, _ = sampling.draw_samples(
        experiment, graphdef, state.ema, spec, mesh, num=args.num, batch_size=batch, seed=seed,
    )  # fmt: skip
    sampling.write_samples(os.path.join(workdir, "sweep_samples.npz"), x, None)
    train = reference.run_dataset(experiment.data).images
    out = mem.memorization_report(
        mem.pixel_vectors(x), mem.pixel_vectors(train), space="pixel",
        delta_m=deltas["delta_m"], delta_s=deltas["delta_s"],
    )  # fmt: skip
    out = {key.removeprefix("pixel/"): v for key, v in out.items()}
    losses = _final_loss(workdir)
    return {"K": k, "seed": seed, "train_seconds": round(train_s, 1), "final_loss": losses, **out}


def thresholds(args) -> dict:
    """The pixel-space thresholds: calibrated on the data (see the module doc) or the
    defaults; with how they were obtained."""
    from core import reference
    from metrics import memorization as mem

    if args.deltas == "default":
        dm, ds = mem.DELTAS["pixel"]
        return {"delta_m": dm, "delta_s": ds, "how": "metrics.memorization.DELTAS['pixel']"}
    data = sweep_data(args)
    train = mem.pixel_vectors(reference.run_dataset(data, "train").images)
    heldout = reference.run_dataset(data, "test").images[: args.calibrate_num]
    out = mem.calibrate_deltas(train, mem.pixel_vectors(heldout))
    out["how"] = (
        f"0.1 % quantiles of {len(heldout)} test images' distances to the nearest of the "
        f"{len(train)} training images (delta_m) and to the nearest other test image (delta_s)"
    )
    return out


def sweep_data(args):
    """The sweep's dataset (the whole training split, and its test split)."""
    from core.experiment import Experiment

    return Experiment.from_config(make_config(args, 0)).data


SUMMED = ("memorized", "spurious", "generalized", "ratio_memorized", "nn_train_median")


def summarize(results: list[dict]) -> list[dict]:
    """Per K: the mean and standard deviation over seeds of the fractions."""
    out = []
    for k in sorted({r["K"] for r in results}):
        rows = [r for r in results if r["K"] == k]
        entry = {"K": k, "seeds": len(rows)}
        for key in SUMMED:
            values = np.array([r[key] for r in rows], np.float64)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def _final_loss(workdir: str) -> float | None:
    from core.writer import read_metrics

    losses = [r["loss"] for r in read_metrics(workdir) or [] if "loss" in r]
    return losses[-1] if losses else None


def plot(summary: list[dict], caps: dict, path: str, title: str) -> None:
    """Fractions memorized / spurious / generalized (mean ± std over seeds) and the ratio
    test against K, the capacities marked."""
    from matplotlib.figure import Figure

    ks = [r["K"] for r in summary]
    fig = Figure(figsize=(6.5, 4.2), dpi=120)
    ax = fig.subplots()
    for name, style in (("memorized", "o-"), ("spurious", "s-"), ("generalized", "^-")):
        mean = [r[name] for r in summary]
        ax.errorbar(ks, mean, yerr=[r[f"{name}_std"] for r in summary], fmt=style, ms=4,
                    capsize=3, label=name)  # fmt: skip
    ax.plot(ks, [r["ratio_memorized"] for r in summary], "k--", lw=1, label="ratio test < 1/3")
    for key, color in (("memorization_capacity", "C0"), ("spurious_peak", "C1"),
                       ("generalization_capacity", "C2")):  # fmt: skip
        if caps.get(key):
            ax.axvline(caps[key], color=color, ls=":", lw=1)
    ax.set(
        xscale="log",
        xlabel="training set size K",
        ylabel="fraction of samples",
        ylim=(-0.03, 1.03),
        title=title,
    )
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)


def main(argv: list[str]) -> None:
    args = parse(argv)
    from core.errors import UserError

    try:
        ks = sorted({int(k) for k in args.ks.split(",")})
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(
            f"--ks and --seeds must be comma lists of integers, got {args.ks!r}, {args.seeds!r}"
        ) from None
    resolve_settings(args, make_config(args, ks[0]))
    deltas = thresholds(args)
    print(json.dumps({"thresholds": deltas}), flush=True)
    results = []
    for k in ks:
        for seed in seeds:
            results.append(run_one(args, k, seed, deltas))
            print(json.dumps(results[-1]), flush=True)
        # after every K: a sweep cut short (a time limit) keeps the sizes it finished
        write(args, results, deltas)
    print(f"wrote {args.out}.json and {args.out}.png")


def write(args, results: list[dict], deltas: dict) -> None:
    """`<out>.json` (settings, thresholds, the results so far, their summary per K and the
    capacities) and `<out>.png`."""
    import jax

    from metrics import memorization as mem
    from metrics.memorization import capacities

    settings = {
        key: getattr(args, key)
        for key in (
            "data_path",
            "tiny",
            "ks",
            "steps",
            "batch",
            "num",
            "lr",
            "warmup",
            "ema",
            "sample_steps",
            "seeds",
            "variant",
        )
    }
    settings.update(
        config=CONFIG,
        space="pixel",
        delta_m=deltas["delta_m"],
        delta_s=deltas["delta_s"],
        ratio_k=2,
        ratio_threshold=1 / 3,
        devices=[str(d) for d in jax.devices()],
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    summary = summarize(results)
    ks = [r["K"] for r in summary]
    caps = capacities(ks, *([r[n] for r in summary] for n in mem.CATEGORIES))
    # the same crossing for the ratio test's fraction (scale-free: no delta_m), beside
    ratio = [r["ratio_memorized"] for r in summary]
    caps["ratio_memorization_capacity"] = capacities(ks, ratio, ratio, ratio)[
        "memorization_capacity"
    ]
    with open(args.out + ".json", "w") as f:
        json.dump(
            {"settings": settings, "thresholds": deltas, "results": results,
             "summary": summary, "capacities": caps},
            f, indent=2,
        )  # fmt: skip
    net = "MLP" if args.mlp else "U-Net"
    label = "tiny CPU check" if args.tiny else f"{args.steps} steps"
    plot(summary, caps, args.out + ".png",
         f"MNIST {net} ({label}), {args.num} samples per K and seed")  # fmt: skip


if __name__ == "__main__":
    run(main)

r"""Memorization against training-set size: train the same model on MNIST `train[:K]` for
K = 2^k, sample, and split the samples into memorized / spurious / generalized (Pham et al.
2025; `metrics.memorization`), plus the distance-ratio test.

  # the real run (one GPU): MNIST U-Net, the same number of steps for every K
  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.memorization_sweep \
      --workdir runs/mem_sweep --out docs/memorization_vs_K
  # a CPU-sized check of the whole pipeline (smoke U-Net, few steps, few samples)
  python -m scripts.memorization_sweep --tiny --workdir /tmp/mem_sweep --out /tmp/mem_vs_K

Without tensorflow-datasets, `--data-path data/mnist_{split}.npz` (`scripts.export_npz`).

The model and its training settings are the experiment config
`experiments/memorization/mnist_unet_sweep.py` (variant `k=<K>`, `tiny=True`, `data_path`,
`seed`); `--steps`, `--batch`, `--lr`, `--warmup`, `--ema` and `--sample-steps` override
its defaults. `--ks` and `--num` are the sweep's own.

Writes `<out>.json` (settings and, per K, the fractions and distance statistics) and
`<out>.png` (fractions against K). Each K trains in `<workdir>/K<K>` and resumes there.
"""

import argparse
import json
import os
import time

from scripts.common import argument_parser, run

# the model and its training settings (those of --tiny too): the experiment config
CONFIG = "experiments/memorization/mnist_unet_sweep.py"
# the sweep: training-set sizes and samples per K
FULL = dict(ks="4,16,64,256,1024,4096,16384", num=1024)  # 70k steps in all: fits 30 GPU minutes
TINY = dict(ks="4,32,256,2048", num=64)
# flags that override the config's training settings: its variant keys of the same names
TRAINING = ("steps", "batch", "lr", "warmup", "ema", "sample_steps")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("memorization_sweep", __doc__)
    p.add_argument("--workdir", required=True, help="one run directory per K inside")
    p.add_argument("--out", required=True, help="output prefix: <out>.json, <out>.png")
    p.add_argument("--tiny", action="store_true", help="CPU-sized settings (smoke U-Net)")
    p.add_argument("--ks", help="training-set sizes, comma list")
    p.add_argument("--steps", type=int, help="training steps for every K")
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--num", type=int, help="generated samples per K")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--ema", type=float, help="EMA decay")
    p.add_argument("--sample-steps", type=int, help="Heun steps for sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-path", default=None, help="MNIST as .npz files (mnist_{split}.npz) instead of tfds"
    )
    args = p.parse_args(argv[1:])
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.variant = variant(args)
    return args


def variant(args) -> str:
    """The config variant of the flags, but K: `tiny`, `data_path`, `seed` and the explicit
    training settings (unset ones are the config's defaults)."""
    from core.errors import UserError

    items = {"tiny": True} if args.tiny else {}
    if args.data_path:
        if "," in args.data_path:
            raise UserError(f"--data-path={args.data_path!r}: a comma cannot pass in a variant")
        items["data_path"] = args.data_path
    items["seed"] = args.seed
    items.update({key: getattr(args, key) for key in TRAINING if getattr(args, key) is not None})
    return ",".join(f"{key}={value}" for key, value in items.items())


def make_config(args, k: int):
    """The sweep's experiment config on `train[:k]`, with the flags' training settings."""
    from core import config as config_lib

    return config_lib.load(f"{CONFIG}:k={k},{args.variant}")


def resolve_settings(args, config) -> None:
    """The training settings the config gives (flag or default) into `args`, for the JSON."""
    args.steps, args.batch = config.total_steps, config.batch_size
    args.lr, args.warmup = config.optim.lr, config.optim.warmup_steps
    args.ema, args.sample_steps = config.ema_decay, config.sample.num_steps


def run_one(args, k: int) -> dict:
    """Train (or resume) on `train[:k]`, sample `args.num`, and measure memorization."""

    from core import reference, sampling, sharding, trainer
    from core.experiment import Experiment, read_data_spec
    from metrics import memorization as mem

    experiment = Experiment.from_config(make_config(args, k))
    workdir = os.path.join(args.workdir, f"K{k}")
    t0 = time.perf_counter()
    state = trainer.train(experiment, workdir)
    train_s = time.perf_counter() - t0
    mesh = experiment.mesh.make()
    graphdef, _ = experiment.network.abstract()
    batch = sharding.sample_batch(mesh, 256, args.num)
    spec = read_data_spec(workdir)
    x, _ = sampling.draw_samples(
        experiment, graphdef, state.ema, spec, mesh, num=args.num, batch_size=batch,
        seed=args.seed,
    )  # fmt: skip
    sampling.write_samples(os.path.join(workdir, "sweep_samples.npz"), x, None)
    train = reference.run_dataset(experiment.data).images
    out = mem.memorization_report(mem.pixel_vectors(x), mem.pixel_vectors(train), space="pixel")
    out = {key.removeprefix("pixel/"): v for key, v in out.items()}
    losses = _final_loss(workdir)
    return {"K": k, "train_seconds": round(train_s, 1), "final_loss": losses, **out}


def _final_loss(workdir: str) -> float | None:
    from core.writer import read_metrics

    losses = [r["loss"] for r in read_metrics(workdir) or [] if "loss" in r]
    return losses[-1] if losses else None


def plot(results: list[dict], path: str, title: str) -> None:
    """Fractions memorized / spurious / generalized (and the ratio test) against K."""
    from matplotlib.figure import Figure

    ks = [r["K"] for r in results]
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for name, style in (("memorized", "o-"), ("spurious", "s-"), ("generalized", "^-")):
        ax.plot(ks, [r[name] for r in results], style, label=name)
    ax.plot(ks, [r["ratio_memorized"] for r in results], "k--", lw=1, label="ratio test < 1/3")
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
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        raise UserError(f"--ks must be a comma list of integers, got {args.ks!r}") from None
    resolve_settings(args, make_config(args, ks[0]))
    results = []
    for k in ks:
        results.append(run_one(args, k))
        print(json.dumps(results[-1]), flush=True)
        # after every K: a sweep cut short (a time limit) keeps the sizes it finished
        write(args, results)
    print(f"wrote {args.out}.json and {args.out}.png")


def write(args, results: list[dict]) -> None:
    """`<out>.json` (settings, and the results so far) and `<out>.png`."""
    import jax

    from metrics.memorization import DELTAS

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
            "seed",
            "variant",
        )
    }
    settings.update(
        config=CONFIG,
        space="pixel",
        delta_m=DELTAS["pixel"][0],
        delta_s=DELTAS["pixel"][1],
        ratio_k=2,
        ratio_threshold=1 / 3,
        devices=[str(d) for d in jax.devices()],
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=2)
    label = "tiny CPU check" if args.tiny else f"{args.steps} steps"
    plot(results, args.out + ".png", f"MNIST U-Net ({label}), {args.num} samples per K")


if __name__ == "__main__":
    run(main)

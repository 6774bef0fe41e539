r"""Memorization against training-set size: train the same model on MNIST `train[:K]` for
K = 2^k, sample, and split the samples into memorized / spurious / generalized (Pham et al.
2025; `metrics.memorization`), plus the distance-ratio test.

  # the real run (one GPU): MNIST U-Net, the same number of steps for every K
  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.memorization_sweep \
      --workdir runs/mem_sweep --out docs/memorization_vs_K
  # a CPU-sized check of the whole pipeline (smoke U-Net, few steps, few samples)
  python -m scripts.memorization_sweep --tiny --workdir /tmp/mem_sweep --out /tmp/mem_vs_K

Without tensorflow-datasets, `--data-path data/mnist_{split}.npz` (`scripts.export_npz`).

Writes `<out>.json` (settings and, per K, the fractions and distance statistics) and
`<out>.png` (fractions against K). Each K trains in `<workdir>/K<K>` and resumes there.
"""

import argparse
import json
import os
import time

from scripts.common import argument_parser, run

CONFIG = "experiments/flow_matching/mnist_unet.py"
FULL = dict(
    ks="4,16,64,256,1024,4096,16384",  # 70k steps in all: fits a 30-minute GPU budget
    steps=10_000,
    batch=128,
    num=1024,
    lr=2e-4,
    warmup=1_000,
    ema=0.999,
    sample_steps=50,
    variant="",
)
TINY = dict(
    ks="4,32,256,2048",
    steps=600,
    batch=32,
    num=64,
    lr=1e-3,
    warmup=50,
    ema=0.98,
    sample_steps=16,
    variant="smoke=True",
)


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
    return args


def make_config(args, k: int):
    """The MNIST U-Net experiment on `train[:k]`, with the sweep's training settings."""
    from core import config as config_lib

    spec = f"{CONFIG}:{args.variant}" if args.variant else CONFIG
    c = config_lib.load(spec)
    c.data.split = f"train[:{k}]"
    c.data.options.in_memory = True
    if args.data_path:
        c.data.update(name="npz", path=args.data_path)
    c.update(total_steps=args.steps, batch_size=args.batch, seed=args.seed, ema_decay=args.ema)
    c.update(log_every=max(1, args.steps // 20), ckpt_every=args.steps, sample_every=0)
    c.optim.update(lr=args.lr, warmup_steps=args.warmup)
    c.sample.num_steps = args.sample_steps
    c.compute_dtype = "float32"
    return c


def run_one(args, k: int) -> dict:
    """Train (or resume) on `train[:k]`, sample `args.num`, and measure memorization."""

    from core import experiment, reference, sampling, sharding, trainer
    from metrics import memorization as mem

    config = make_config(args, k)
    workdir = os.path.join(args.workdir, f"K{k}")
    t0 = time.perf_counter()
    state = trainer.train(config, workdir)
    train_s = time.perf_counter() - t0
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    graphdef, _ = experiment.abstract_network(experiment.network_factory(config))
    batch = sharding.sample_batch(mesh, 256, args.num)
    spec = experiment.read_data_spec(workdir)
    x, _ = sampling.generate(
        graphdef, state.ema, config, spec, mesh, num=args.num, batch_size=batch, seed=args.seed
    )
    sampling.write_samples(os.path.join(workdir, "sweep_samples.npz"), x, None)
    train = reference.dataset_from_config(config).images
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

r"""The attraction-basin experiment (arXiv 2411.16738) at CPU size: a class-conditional
MNIST model trained on a few images per class, sampled from the same noise under guidance
w = 1, constant, interval and dynamic (`samplers.guidance`), with memorized / spurious /
generalized fractions (pixel space, against the training images), FID against MNIST test,
the class accuracy of a classifier run (`--classifier-run`, e.g. one trained with
`experiments/classifier/mnist_cnn.py`) and the gap ||v_cond - v_null|| along the paths.

  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.attraction_basin \
      --workdir /tmp/ab --per-class 4 --steps 3000 --cfg 4 --cfg-interval 0.4,1.0 \
      --num 1000 --classifier-run runs/mnist_cnn --out docs/attraction_basin

Trains in `<workdir>/run` (resumed, or skipped when done) on `<workdir>/train_subset.npz`,
then writes `<out>.json` (settings and, per schedule, the numbers, the mean gap per step and
the switch times), `<out>_gaps.png` (gap curves, switch-time histogram) and
`<out>_samples.png` (the first 20 samples of each schedule, one row each, and the training
images). The logic is `core.attraction_basin`.
"""

import argparse

from scripts.common import argument_parser, run, write_json


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("attraction_basin", __doc__)
    p.add_argument("--workdir", required=True, help="the generator's data and run")
    p.add_argument("--out", required=True, help="output prefix: <out>.json, <out>_*.png")
    p.add_argument("--per-class", type=int, default=4, help="training images per class")
    p.add_argument("--steps", type=int, default=3000, help="training steps")
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cfg", type=float, default=4.0, help="guidance weight of the guided rows")
    p.add_argument("--cfg-interval", default="0.4,1.0", metavar="LO,HI",
                   help="the interval schedule's times (t = 0 noise)")  # fmt: skip
    p.add_argument("--num", type=int, default=1000, help="samples per schedule")
    p.add_argument("--sample-batch", type=int, default=250)
    p.add_argument("--classifier-run", default=None, help="a classifier run: class accuracy")
    p.add_argument("--fid-split", default="test", help="MNIST split of FID's reference")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv[1:])


def main(argv: list[str]) -> None:
    args = parse(argv)
    import datetime
    import os

    import jax
    import numpy as np

    from core import attraction_basin as ab
    from core import plots
    from core.errors import UserError
    from samplers.guidance import parse_interval

    if args.per_class < 1 or args.num < 2:
        raise UserError("--per-class must be >= 1 and --num >= 2")
    interval = parse_interval(args.cfg_interval)
    trained = ab.train(args.workdir, args.per_class, steps=args.steps, batch=args.batch,
                       lr=args.lr, seed=args.seed)  # fmt: skip
    result, traces = ab.measure(
        args.workdir, scale=args.cfg, interval=interval, num=args.num, batch=args.sample_batch,
        seed=args.seed, classifier=args.classifier_run, fid_split=args.fid_split,
    )  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result["gaps_plot"] = ab.plot_gaps(traces, args.out + "_gaps.png")
    train_x = np.load(trained["data"])["x"]
    spread = train_x[:: max(1, len(train_x) // 20)][:20]  # training images across classes
    rows = [traces[name]["images"] for name in traces] + [spread]
    plots.save_image_grid(np.concatenate(rows), args.out + "_samples.png", ncols=20)
    result.update(
        samples_plot=args.out + "_samples.png", workdir=args.workdir, per_class=args.per_class,
        train_steps=args.steps, train_batch=args.batch, lr=args.lr,
        classifier_run=args.classifier_run, date=datetime.date.today().isoformat(),
        jax=jax.__version__, device=str(jax.devices()[0].device_kind),
    )  # fmt: skip
    write_json(result, args.out + ".json")


if __name__ == "__main__":
    run(main)

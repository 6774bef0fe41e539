r"""How much minibatch OT shortens the noise-data pairs of a dataset, before any training:
whether `loss.ot_pairing=True` can straighten the paths there at all.

  python -m scripts.ot_pairs --dataset moons --batches 512
  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.ot_pairs --dataset mnist \
      --batches 128,1024 --regs 0.05,0.01,0.003,0.001

For each batch size, `--repeats` batches of the data (as training sees it: images scaled to
[-1, 1]) are paired with standard normal noise. Printed per batch size, averaged over the
repeats: the mean squared distance of a pair `|x1 - x0|^2` for independent pairs, for the
exact assignment (`scipy.optimize.linear_sum_assignment`: the best permutation, the
shortest pairs any pairing of the batch reaches), and for
`losses.flow_matching.sinkhorn_pairing` at each `--reg` (as the losses call it, with
`--iters` iterations), each as a ratio to the independent pairs, with the number of distinct
noise rows the draw from the plan kept (it draws with replacement).
"""

import argparse
import functools

from scripts.common import argument_parser, run, write_json


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("ot_pairs", __doc__)
    p.add_argument("--dataset", required=True, help="a data.build_source name, or a .npz")
    p.add_argument("--split", default="train")
    p.add_argument("--batches", default="128,512", help="comma list of batch sizes")
    p.add_argument("--regs", default="0.05", help="comma list of Sinkhorn regularisations")
    p.add_argument("--iters", type=int, default=100, help="Sinkhorn iterations")
    p.add_argument("--repeats", type=int, default=5, help="batches per batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (also printed)")
    return p.parse_args(argv[1:])


@functools.cache
def _jitted_pairing():
    """`losses.flow_matching.sinkhorn_pairing` compiled once per shape (it is called per
    batch and per reg)."""
    import jax

    from losses.flow_matching import sinkhorn_pairing

    return jax.jit(sinkhorn_pairing, static_argnames="num_iters")


def pair_costs(data, noise, regs, *, iters: int, key) -> dict:
    """Mean squared pair distances of one batch, `data` and `noise` `[B, D]`:
    `{"independent", "exact", "sinkhorn": {reg: (mean distance, distinct noise rows)}}`."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    sinkhorn_pairing = _jitted_pairing()
    a, b = np.asarray(data, np.float64), np.asarray(noise, np.float64)
    cost = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    rows, cols = linear_sum_assignment(cost)
    sinkhorn = {}
    for reg in regs:
        paired = np.asarray(sinkhorn_pairing(key, noise, data, reg=reg, num_iters=iters))
        distance = float(np.mean(np.sum((data - paired) ** 2, axis=1, dtype=np.float64)))
        sinkhorn[reg] = (distance, len(np.unique(paired, axis=0)))
    return {"independent": float(np.mean(np.diag(cost))), "exact": float(cost[rows, cols].mean()),
            "sinkhorn": sinkhorn}  # fmt: skip


def pair_lengths(x1, batches, regs, *, iters: int, repeats: int, seed: int) -> dict:
    """`pair_costs` of `repeats` batches of `x1 [N, D]` per batch size, averaged; the
    exact assignment's and each Sinkhorn pairing's as ratios to the independent pairs."""
    import jax
    import numpy as np

    from core.errors import UserError

    rng = np.random.default_rng(seed)
    out = {}
    for b in batches:
        if b > len(x1):
            raise UserError(f"batch {b} is larger than the {len(x1)} examples of the data")
        runs = []
        for r in range(repeats):
            data = x1[rng.choice(len(x1), b, replace=False)]
            noise = rng.standard_normal(data.shape).astype(np.float32)
            key = jax.random.key(seed * 1_000_003 + r)
            runs.append(pair_costs(data, noise, regs, iters=iters, key=key))
        base = float(np.mean([c["independent"] for c in runs]))
        sinkhorn = {}
        for reg in regs:
            distance, distinct = np.mean([c["sinkhorn"][reg] for c in runs], axis=0)
            sinkhorn[reg] = {"ratio": distance / base, "distinct_noise_rows": distinct}
        exact = float(np.mean([c["exact"] for c in runs]))
        out[b] = {"independent": base, "exact_ratio": exact / base, "sinkhorn": sinkhorn}
    return out


def main(argv: list[str]) -> None:
    args = parse(argv)
    from core.reference import dataset_from_name, source_images
    from data.arrays import to_float

    x = to_float(source_images(dataset_from_name(args.dataset, args.split).build()))
    x = x.reshape(len(x), -1)
    batches = [int(b) for b in args.batches.split(",")]
    regs = [float(r) for r in args.regs.split(",")]
    result = pair_lengths(x, batches, regs, iters=args.iters, repeats=args.repeats, seed=args.seed)
    write_json(
        {
            "dataset": args.dataset,
            "split": args.split,
            "dim": x.shape[1],
            "iters": args.iters,
            "repeats": args.repeats,
            "by_batch": {str(b): v for b, v in result.items()},
        },
        args.out,
    )


if __name__ == "__main__":
    run(main)

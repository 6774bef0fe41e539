r"""Lost dimensions: directions of a linear manifold with variance blocks that the score keeps,
across training-set sizes N and noise levels sigma (`metrics.lost_dimensions`), for the
closed-form empirical score (no training) and, with `--train-root`, for flow-matching MLPs
trained on N points (`experiments/memorization/linear_blocks_mlp.py`, one run per N in
`<train-root>/n<N>`, resumed there).

  python -m scripts.lost_dimensions --out docs/lost_dimensions
  python -m scripts.lost_dimensions --out docs/lost_dimensions --train-root runs/lostdim \
      --train-sizes 16,128,1024,8192 --steps 4000

Writes `<out>.json` (the distribution, the grid, retained directions per block per source)
and `<out>.png` (retained directions against N, a line per sigma and block).
"""

import os

from scripts.common import argument_parser, run

CONFIG = "experiments/memorization/linear_blocks_mlp.py"


def parse(argv: list[str]):
    p = argument_parser("lost_dimensions", __doc__)
    p.add_argument("--out", required=True, help="output prefix: <out>.json, <out>.png")
    p.add_argument("--sizes", default="1,2,4,8,16,32,64,128,256,512,1024,4096,16384,65536",
                   help="training-set sizes N of the empirical score, comma list")
    p.add_argument("--sigmas", default="0.05,0.1,0.2,0.4", help="noise levels, comma list")
    p.add_argument("--num-points", type=int, default=64, help="test points per cell")
    p.add_argument("--ambient-dim", type=int, default=16)
    p.add_argument("--dims", default="2/2", help="block sizes, separated by /")
    p.add_argument("--vars", default="1.0/0.1", help="block variances, separated by /")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-root", default=None,
                   help="also train (or resume) an MLP per --train-sizes here and measure it")
    p.add_argument("--train-sizes", default="16,128,1024,8192", help="N of the trained MLPs")
    p.add_argument("--steps", type=int, default=4000, help="training steps per MLP")
    return p.parse_args(argv[1:])  # fmt: skip


def _ints(text: str, flag: str) -> list[int]:
    from core.errors import UserError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} needs positive integers, got {text!r}")
    return values


def main(argv: list[str]) -> None:
    args = parse(argv)
    from core.errors import UserError
    from data.linear_blocks import LinearBlocks
    from metrics import lost_dimensions as ld

    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
        dims = tuple(int(k) for k in args.dims.split("/"))
        variances = tuple(float(v) for v in args.vars.split("/"))
    except ValueError:
        raise UserError("--sigmas: comma list of numbers; --dims, --vars: '/'-separated") from None
    if not all(0 < s for s in sigmas):
        raise UserError(f"--sigmas must be positive, got {args.sigmas}")
    spec = LinearBlocks(args.ambient_dim, dims, variances, basis_seed=args.seed)
    sizes = _ints(args.sizes, "--sizes")
    study = ld.empirical_study(spec, sizes, sigmas, num_points=args.num_points, seed=args.seed)
    if args.train_root:
        workdirs = _train(args, spec, _ints(args.train_sizes, "--train-sizes"))
        trained_spec, table = ld.network_study(
            workdirs, sigmas, num_points=args.num_points, seed=args.seed
        )
        if trained_spec != spec:
            raise UserError(f"the runs in {args.train_root} are of {trained_spec}, not {spec}")
        study.add("trained MLP", sorted(workdirs), table)
    ld.write_study(study, f"{args.out}.json", f"{args.out}.png")
    print(f"wrote {args.out}.json and {args.out}.png")


def _train(args, spec, sizes: list[int]) -> dict[int, str]:
    from core import config as config_lib
    from core.experiment import Experiment
    from core.trainer import train

    workdirs = {}
    for n in sizes:
        variant = (
            f"n={n},steps={args.steps},seed={args.seed},ambient_dim={spec.ambient_dim},"
            f"dims={'/'.join(map(str, spec.block_dims))},"
            f"vars={'/'.join(map(str, spec.block_vars))}"
        )
        config = config_lib.load(f"{CONFIG}:{variant}")
        config.data.options.basis_seed = spec.basis_seed
        workdirs[n] = os.path.join(args.train_root, f"n{n}")
        train(Experiment.from_config(config), workdirs[n])
    return workdirs


if __name__ == "__main__":
    run(main)

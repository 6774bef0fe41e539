"""Sample from a run's checkpoint:

  python -m scripts.sample --workdir runs/x --num 10000 --steps 50 --sampler heun \
      [--cfg 2.0] [--step N] [--raw] --out samples.npz

Writes `arr_0` (uint8 NHWC images, or float32 arrays) and `arr_1` (labels, conditional
models) plus a PNG grid beside the npz. EMA weights unless `--raw`.
"""

import argparse

from scripts.common import (
    add_sample_option_flag,
    argument_parser,
    maybe_initialize_distributed,
    run,
    sample_run,
)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("sample", __doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="default: the config's")
    p.add_argument("--sampler", default=None, help="default: the config's")
    p.add_argument("--cfg", type=float, default=None, help="guidance weight (1 = none)")
    p.add_argument("--label", type=int, default=None, help="one class for all samples")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    p.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    p.add_argument("--batch", type=int, default=256, help="samples per device call")
    p.add_argument("--seed", type=int, default=0)
    add_sample_option_flag(p)
    return p.parse_args(argv[1:])


def main(argv: list[str]) -> None:
    args = parse(argv)
    maybe_initialize_distributed()
    import jax

    from core import sampling

    x, labels, _, step = sample_run(args, label=args.label)
    if jax.process_index() == 0:
        png = sampling.write_samples(args.out, x, labels)
        print(f"wrote {len(x)} samples from step {step} to {args.out} (preview {png})")


if __name__ == "__main__":
    run(main)

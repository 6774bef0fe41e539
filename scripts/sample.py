r"""Sample from a run's checkpoint:

  python -m scripts.sample --workdir runs/x --num 10000 --steps 50 --sampler heun \
      [--cfg 2.0] [--ckpt-step N] [--raw] --out samples.npz

Writes `arr_0` (uint8 NHWC images, or float32 arrays) and `arr_1` (labels, conditional
models) plus a PNG grid beside the npz. EMA weights unless `--raw`.
"""

import argparse

from scripts.common import (
    add_sampling_flags,
    argument_parser,
    maybe_initialize_distributed,
    npz_path,
    run,
    sample_run,
)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("sample", __doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--label", type=int, default=None, help="one class for all samples")
    add_sampling_flags(p, num=64)
    args = p.parse_args(argv[1:])
    args.out = npz_path(args.out)  # numpy adds .npz where it is missing: report that name
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    maybe_initialize_distributed()
    import jax

    from core import sampling

    drawn = sample_run(args, label=args.label)
    if jax.process_index() == 0:
        png = sampling.write_samples(args.out, drawn.samples, drawn.labels)
        print(
            f"wrote {len(drawn.samples)} samples from step {drawn.step} to {args.out} "
            f"(preview {png})"
        )


if __name__ == "__main__":
    run(main)

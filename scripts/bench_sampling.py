r"""Sampling throughput of trained runs, each with its own sampler, frozen networks and options:

  python -m scripts.bench_sampling --workdir runs/givt --workdir runs/mnist_tarflow \
      --batch 256 --repeats 3 [--cfg 2.0] [--sample-option temperature=0.9] --out speed.jsonl

Prints one JSON object per run (`core.benchmark.bench_run_sampling`): images/s of the
compiled sampling program at `--batch` after one compiling call (reported apart), the
images' copy to the host included, with the run's family, sampler, options and parameter
count. For comparing autoregressive samplers on their trained weights, e.g. GIVT's
token-by-token sampling (VAE decoding included) against TarFlow's sequential inverse.
The sampling flags apply to every run named; an option a run's sampler does not take is an
error naming it.
"""

import argparse

from scripts.common import (
    add_sampling_flags,
    append_json_line,
    argument_parser,
    run,
    sampling_kwargs,
)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("bench_sampling", __doc__)
    p.add_argument("--workdir", action="append", required=True, help="a run (repeatable)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    add_sampling_flags(p, num=None)  # --batch: the samples per timed call
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = p.parse_args(argv[1:])
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    from core import benchmark

    for workdir in args.workdir:
        result = benchmark.bench_run_sampling(
            workdir, batch=args.batch, repeats=args.repeats, **sampling_kwargs(args)
        )
        append_json_line(result, args.out)


if __name__ == "__main__":
    run(main)

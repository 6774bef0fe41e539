r"""Benchmark the train step and the sampler of an experiment on synthetic data:

  python -m scripts.bench --config experiments/flow_matching/cifar10_dit.py:size=B/2 \
      --batch 256 [--dtype bfloat16] [--steps 50] [--peak-tflops 989] [--out bench.jsonl]

Prints one JSON object: step time, images/s, analytic forward GFLOPs per image, achieved
TFLOP/s (3 × forward FLOPs × images/s) and MFU against `--peak-tflops` (default 989,
H100 SXM dense bf16), and sampling images/s. See core/benchmark.py for the FLOP count.
"""

import argparse

from scripts.common import append_json_line, argument_parser, run

SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("bench", __doc__)
    p.add_argument("--config", required=True, help="experiment config path[:variant]")
    p.add_argument("--batch", type=int, default=None, help="default: the config's")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the config's)")
    p.add_argument("--shape", default=None, help="example shape, e.g. 32,32,3")
    p.add_argument("--steps", type=int, default=50, help="timed train steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--sample-batch", type=int, default=None, help="default: --batch")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--sample-repeats", type=int, default=3)
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    return p.parse_args(argv[1:])


def main(argv: list[str]) -> None:
    args = parse(argv)
    import jax

    from core import benchmark
    from core import config as config_lib
    from core.errors import UserError
    from core.experiment import Experiment

    config = config_lib.load(args.config)
    config.batch_size = args.batch or config.batch_size
    config.compute_dtype = args.dtype or config.compute_dtype
    experiment = Experiment.from_config(config)
    if args.shape:
        shape = tuple(int(s) for s in args.shape.split(","))
    elif config.data.name in SHAPES:
        shape = SHAPES[config.data.name]
    else:
        raise UserError(f"no known example shape for data {config.data.name!r}: pass --shape")
    result = {
        "config": args.config,
        "batch": config.batch_size,
        "dtype": config.compute_dtype,
        "shape": list(shape),
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
    }
    result.update(benchmark.bench_train(experiment, shape, steps=args.steps, warmup=args.warmup))
    forward = benchmark.forward_flops(experiment, shape)
    result.update(benchmark.mfu(forward, result["images_per_sec"], args.peak_tflops))
    if not args.no_sampling:
        result.update(
            benchmark.bench_sampling(
                experiment,
                shape,
                batch=args.sample_batch or config.batch_size,
                num_steps=args.sample_steps,
                sampler=args.sampler,
                repeats=args.sample_repeats,
            )
        )
    append_json_line(result, args.out)


if __name__ == "__main__":
    run(main)

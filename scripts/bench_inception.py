r"""Time of the FID Inception network per image, by batch size, on this machine's backend.

  python -m scripts.bench_inception --batches 10,25,50 --num 100 --repeats 2

For each batch size: one untimed call compiles, then `--repeats` passes over `--num` random
28x28 gray images (resized to 299x299 as for FID) are timed; prints wall seconds and CPU
seconds (this process, all threads) per image, each pass on its own line, in the order given
(so a batch size measured first and last shows the drift of a shared machine). What the
default of `--inception-batch` (`metrics.fid.DEFAULT_BATCH`) was chosen from.
"""

import argparse
import time

from scripts.common import argument_parser, run, write_json


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("bench_inception", __doc__)
    p.add_argument("--batches", default="10,25,50", help="comma list of batch sizes")
    p.add_argument("--num", type=int, default=100, help="images per timed pass")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per batch size")
    p.add_argument("--precision", default="highest", help="models.inception.PRECISIONS")
    p.add_argument("--out", default=None, help="JSON file (also printed)")
    return p.parse_args(argv[1:])


def main(argv: list[str]) -> None:
    args = parse(argv)
    import jax
    import numpy as np

    from core.errors import UserError
    from metrics import fid as fm
    from models.inception import load_inception

    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise UserError(
            f"--batches must be a comma list of integers, got {args.batches!r}"
        ) from None
    if not batches or min(batches) < 1 or args.num < 1 or args.repeats < 1:
        raise UserError("--batches, --num and --repeats must be positive")
    net = load_inception(precision=args.precision)
    images = np.random.default_rng(0).integers(0, 256, (args.num, 28, 28, 1), np.uint8)
    rows = []
    for batch in batches:
        fm.inception_features(images[:batch], net, batch_size=batch)  # compiles
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            fm.inception_features(images, net, batch_size=batch)
            row = {
                "batch": batch,
                "wall_s_per_image": (time.perf_counter() - wall) / args.num,
                "cpu_s_per_image": (time.process_time() - cpu) / args.num,
            }
            rows.append(row)
            print(row, flush=True)
    result = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "precision": args.precision,
        "num": args.num,
        "passes": rows,
    }
    write_json(result, args.out)


if __name__ == "__main__":
    run(main)

r"""FID between two image files with the Inception convolutions at one precision, and the GPU's
TF32 rounding optionally emulated on a CPU, on the network alone.

  python -m scripts.fid_precision --a a.npz --b b.npz --precision tf32x3 --emulate-tf32 \
      --out fid.json

`--emulate-tf32` computes the features inside `core.precision.tf32_matmuls()`: both operands
of every float32 product that an NVIDIA GPU runs on TF32 tensor cores are rounded to TF32, so
that what a precision does to FID on the GPU is measured here. That is every convolution at
`--precision default` or `tf32x3`; at `highest` none (the GPU computes them in float32, and so
the emulation changes nothing), and the bilinear resize to 299x299 keeps full float32 in all
cases (`metrics.fid.preprocess` asks for `HIGHEST`, as on the GPU). Files: `.npz` with uint8
images in `arr_0` (the ADM layout).
"""

import argparse
import contextlib
import time

import numpy as np

from scripts.common import argument_parser, run, write_json


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("fid_precision", __doc__)
    p.add_argument("--a", required=True, help=".npz with uint8 images in arr_0")
    p.add_argument("--b", required=True, help=".npz with uint8 images in arr_0")
    p.add_argument("--precision", default="highest", help="models.inception.PRECISIONS")
    p.add_argument("--emulate-tf32", action="store_true", help="the GPU's TF32 rounding")
    p.add_argument("--batch", type=int, default=None, help="default: metrics.fid.default_batch()")
    p.add_argument("--out", default=None, help="JSON file (also printed)")
    return p.parse_args(argv[1:])


def features(images: np.ndarray, net, batch: int | None, emulate: bool) -> np.ndarray:
    """Inception features `[N, 2048]`, with the GPU's TF32 rounding emulated if `emulate`
    (`metrics.fid.inception_features`, traced inside `tf32_matmuls()`)."""
    from core.precision import tf32_matmuls
    from metrics import fid as fm

    with tf32_matmuls() if emulate else contextlib.nullcontext():
        return fm.inception_features(images, net, batch_size=batch)


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    args = parse(argv)
    from core.errors import UserError
    from data.arrays import ArraySource
    from metrics import fid as fm
    from models.inception import load_inception

    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    sets = []
    for path in (args.a, args.b):
        try:
            sets.append(ArraySource(path).x)  # checks the ADM layout
        except UserError as e:
            raise UserError(f"could not read images from {path}: {e}") from None
    net = load_inception(precision=args.precision)
    fa, fb = (features(x, net, args.batch, args.emulate_tf32) for x in sets)
    result = {
        "fid": fm.fid_from_features(fa, fb),
        "a": args.a,
        "b": args.b,
        "num": [len(x) for x in sets],
        "inception_precision": args.precision,
        "emulate_tf32": args.emulate_tf32,
        "wall_seconds": time.perf_counter() - start,
    }
    write_json(result, args.out)


if __name__ == "__main__":
    run(main)

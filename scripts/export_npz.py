r"""Write dataset splits as `.npz` files, for machines without tensorflow-datasets.

  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.export_npz --dataset mnist \
      --splits train,test --out .devdata/mnist_{split}.npz

Each split becomes one compressed file in the ADM layout (`arr_0` uint8 NHWC images, the
stored bytes; `arr_1` int64 labels where the dataset has them), which `data.name=npz` with
`data.path=.devdata/mnist_{split}.npz` trains on and `scripts.evaluate --dataset
.devdata/mnist_{split}.npz` evaluates against, split by split.
"""

import argparse
import os

from scripts.common import argument_parser, run


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("export_npz", __doc__)
    p.add_argument("--dataset", required=True, help="dataset name (tfds, toy, ...)")
    p.add_argument("--splits", default="train,test", help="comma list of splits")
    p.add_argument("--out", required=True, help="output path with {split} in it")
    p.add_argument("--data-dir", default=None, help="tfds data_dir (default $TFDS_DATA_DIR)")
    p.add_argument("--no-labels", action="store_true", help="leave the labels out")
    return p.parse_args(argv[1:])


def export(dataset: str, split: str, path: str, *, labels: bool, data_dir: str | None) -> dict:
    """Write one split; returns what was written (path, count, shape, bytes)."""
    import numpy as np

    import data
    from core import reference
    from core.errors import UserError

    options = {"data_dir": data_dir} if data_dir else {}
    source = None
    if labels:
        try:
            source = data.build_source(dataset, split=split, use_labels=True, **options)
        except UserError:  # a dataset without labels
            source = None
    labelled = source is not None and source.num_classes > 0
    if source is None:
        source = data.build_source(dataset, split=split, **options)
    images = reference.source_images(source)
    arrays = {"arr_0": images}
    if labelled:
        n = source.num_examples
        chunks = [np.arange(s, min(s + 4096, n)) for s in range(0, n, 4096)]
        arrays["arr_1"] = np.concatenate([source.__getitems__(i)["cond"] for i in chunks])
        arrays["arr_1"] = arrays["arr_1"].astype(np.int64)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return {
        "path": path,
        "num": len(images),
        "shape": list(images.shape[1:]),
        "labels": "arr_1" in arrays,
        "bytes": os.path.getsize(path),
    }


def main(argv: list[str]) -> None:
    args = parse(argv)
    from core.errors import UserError
    from data import npz_path

    if "{split}" not in args.out:
        raise UserError(f"--out {args.out!r} needs {{split}} in it (one file per split)")
    for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
        info = export(
            args.dataset,
            split,
            npz_path(args.out, split),  # train[:100] writes the train file, of 100 rows
            labels=not args.no_labels,
            data_dir=args.data_dir,
        )
        print(" ".join(f"{k}={v}" for k, v in info.items()))


if __name__ == "__main__":
    run(main)

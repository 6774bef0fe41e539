r"""A classifier run's verdict on generated samples: the fraction classified as the label
they were drawn for, and the mean log-probability of that label.

  python -m scripts.classify --samples searched.npz --classifier-run runs/mnist_cnn \
      [--out verdict.json]

`--samples` is an ADM `.npz` with labels (`arr_1`), as `scripts.sample` and
`scripts.search` write for a class-conditional run.
"""

from scripts.common import argument_parser, run, write_json


def main(argv: list[str]) -> None:
    p = argument_parser("classify", __doc__)
    p.add_argument("--samples", required=True)
    p.add_argument("--classifier-run", required=True, help="run of the classifier family")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv[1:])
    from core.errors import UserError
    from core.evaluation.report import check_samples_file
    from metrics.classifier_verifier import classify_samples

    x, labels = check_samples_file(args.samples)  # layout, dtype, shape, one label each
    if labels is None:
        raise UserError(f"{args.samples} has no labels (arr_1): a conditional run's samples")
    result = classify_samples(args.classifier_run, x, labels)
    write_json({"samples": args.samples, **result}, args.out)


if __name__ == "__main__":
    run(main)

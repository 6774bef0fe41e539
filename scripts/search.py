r"""Inference-time noise search (arXiv 2501.09732) on a run's checkpoint:

  # best of 16 initial noises per sample, scored by a classifier run of the requested class
  python -m scripts.search --workdir runs/mnist_cond --algo random --candidates 16 \
      --num 1000 --sampling-steps 32 --verifier classifier --verifier-run runs/mnist_cnn \
      --out searched.npz
  # zero-order search around a pivot; paths with branching; a budget instead of counts
  python -m scripts.search --workdir runs/x --algo zero_order --radius 0.2 --rounds 4 \
      --candidates 8 --verifier self_consistency --out z.npz
  python -m scripts.search --workdir runs/x --algo paths --branches 4 --budget-nfe 2000 \
      --verifier inception --out p.npz
  # a 2-D toy with a known density
  python -m scripts.search --workdir runs/gaussians --verifier density --candidates 8 --out s.npz

Writes the samples as `scripts.sample` does (ADM `.npz` and a PNG), a JSON beside them
(`<out>.json`: the settings, the generator's and the verifier's network evaluations per
sample, and per unit of the search the best score's mean and the NFEs spent) and a plot of
the best score against the NFEs (`<out>_curve.png`). Verifiers: density, self_consistency,
likelihood (`--verifier-run` a flow), classifier (`--verifier-run` a classifier run),
inception (the run's data, or `--dataset` and `--split`: the reference's Inception statistics
come first, cached; on a CPU a 60,000-image training set takes hours, a 10,000-image test
split about 20 minutes). `--budget-nfe` picks the count (random:
candidates, zero_order: rounds, paths: candidates) that fits the NFEs per sample.
"""

import argparse
import os

from scripts.common import (
    add_guidance_flags,
    add_sample_option_flag,
    argument_parser,
    maybe_initialize_distributed,
    npz_path,
    parse_sample_options,
    run,
    sampling_kwargs,
    write_json,
)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("search", __doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="output .npz (JSON and PNGs beside it)")
    p.add_argument("--algo", default="random", help="random, zero_order or paths")
    p.add_argument("--verifier", required=True)
    p.add_argument("--verifier-run", default=None, help="run directory of the verifier's network")
    p.add_argument("--verifier-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--candidates", type=int, default=4, help="N")
    p.add_argument("--rounds", type=int, default=2, help="zero_order: R")
    p.add_argument("--radius", type=float, default=0.2, help="zero_order: λ in [0, 1]")
    p.add_argument("--branches", type=int, default=2, help="paths: M")
    p.add_argument("--start", type=int, default=None, help="paths: steps before branching")
    p.add_argument("--delta-b", type=int, default=None, help="paths: steps forward")
    p.add_argument("--delta-f", type=int, default=0, help="paths: steps re-noised back")
    p.add_argument("--budget-nfe", type=int, default=None, help="NFEs per sample")
    p.add_argument("--dataset", default=None, help="reference data (inception verifier)")
    p.add_argument(
        "--split", default=None,
        help="the --dataset split (default train), e.g. test (its Inception statistics are "
        "computed once and cached; a CPU takes about 0.1-0.2 s an image)",
    )  # fmt: skip
    p.add_argument(
        "--score-with", default=None, metavar="NAME[=RUN],...",
        help="other verifiers that score the chosen samples after the search, e.g. "
        "classifier=runs/mnist_cnn,inception,self_consistency (the JSON's `scores`; not "
        "part of the NFEs): how searching against one verifier reads to the others",
    )  # fmt: skip
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="samples per device call")
    p.add_argument("--sampling-steps", "--steps", dest="steps", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--cfg", type=float, default=None, help="guidance weight (1 = none)")
    add_guidance_flags(p)
    p.add_argument("--label", type=int, default=None, help="one class for all samples")
    p.add_argument("--ckpt-step", "--step", dest="step", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    p.add_argument("--seed", type=int, default=0)
    add_sample_option_flag(p)
    args = p.parse_args(argv[1:])
    args.out = npz_path(args.out)  # numpy adds .npz where it is missing: report that name
    return args


def _score_with(text: str | None, UserError) -> tuple[tuple[str, str | None], ...]:
    """`"classifier=runs/c,inception"` -> `(("classifier", "runs/c"), ("inception", None))`."""
    out = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, run_dir = item.partition("=")
        if sep and not run_dir.strip():
            raise UserError(f"--score-with: {item!r} names no run after '='")
        out.append((name.strip(), run_dir.strip() if sep else None))
    return tuple(out)


def main(argv: list[str]) -> None:
    args = parse(argv)
    maybe_initialize_distributed()
    import jax

    from core import sampling
    from core import search as search_lib
    from core.errors import UserError

    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    settings = search_lib.Settings(
        algo=args.algo, candidates=args.candidates, rounds=args.rounds, radius=args.radius,
        branches=args.branches, start=args.start, delta_b=args.delta_b, delta_f=args.delta_f,
    )  # fmt: skip
    dataset = None
    if args.split and not args.dataset:
        raise UserError("--split is a split of --dataset: give --dataset too")
    if args.dataset:
        from core import reference

        dataset = reference.dataset_from_name(args.dataset, args.split or "train")
    samples, labels, report = search_lib.search_run(
        args.workdir, settings, args.verifier, num=args.num,
        verifier_run=args.verifier_run,
        verifier_options=parse_sample_options(args.verifier_option),
        budget_nfe=args.budget_nfe, dataset=dataset, label=args.label,
        score_with=_score_with(args.score_with, UserError), **sampling_kwargs(args),
    )  # fmt: skip
    if jax.process_index() != 0:
        return
    png = sampling.write_samples(args.out, samples, labels)
    stem = os.path.splitext(args.out)[0]
    report["samples"], report["preview"] = args.out, png
    report["curve"] = search_lib.plot_curve(report, stem + "_curve.png")
    write_json(report, stem + ".json")


if __name__ == "__main__":
    run(main)

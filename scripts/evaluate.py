r"""Evaluate samples: FID, KID, precision/recall, Inception Score, memorization, effective
dimension.

  # sample from a run's checkpoint (sharded over all devices), then evaluate
  python -m scripts.evaluate --workdir runs/x --num 50000 --metrics fid,kid,pr,memorization \
      --out eval.json
  # samples made anywhere (ADM .npz, arr_0 uint8 NHWC), against a dataset (tfds by name)
  python -m scripts.evaluate --samples samples.npz --dataset mnist --metrics fid,memorization \
      --out eval.json
  # reference statistics (pytorch-fid's mu, sigma) of a dataset split or of a sample file
  python -m scripts.evaluate --dataset mnist --split train --write-stats stats.npz
  python -m scripts.evaluate --samples b.npz --write-stats b_stats.npz
  # FID between two sample files
  python -m scripts.evaluate --samples a.npz --ref-stats b_stats.npz --metrics fid

  # the run's network on its held-out split (no sampling of the whole model needed)
  python -m scripts.evaluate --workdir runs/earth_volcano --metrics nll --split test
  python -m scripts.evaluate --workdir runs/earth_geoloc --metrics geo --split test
  python -m scripts.evaluate --workdir runs/mnist_cnn --metrics accuracy --split test

Metrics of samples: fid, kid, pr, is, memorization, effdim, swd (sliced Wasserstein, for
low-dimensional data). The reference (FID/KID/PR/swd) and the training set (memorization)
are `--dataset/--split`, or with `--workdir` the run's own data (`config.json`'s `data`);
`--ref-stats` replaces the reference statistics for FID.
Dataset features and statistics are cached in `--cache-dir` (default
~/.cache/driftlab/fid_stats). `effdim` needs `--workdir` (the score network).
Metrics of the run's network on its data split `--split` (default test): nll or bpd (the
same numbers: nats, and bits/dim for images and normalizing flows), geo (conditional
models on S^2: one prediction per held-out example), accuracy (a classifier run: top-1),
on a random subset of `--heldout-num` examples (default: all on an accelerator, 2,048 on
a CPU; the count is said on stderr), with a progress bar.
The JSON (top-level `fid` when asked for) is written to `--out` and printed; plots go
beside it (`<out>_effdim.png`, `<out>_geo.png`).
"""

import argparse
import os
import sys
import time

from scripts.common import (
    add_heldout_num_flag,
    add_nll_solver_flags,
    add_sampling_flags,
    argument_parser,
    maybe_initialize_distributed,
    nll_solver_options,
    run,
    sampling_kwargs,
    write_json,
)

DEFAULT_METRICS = "fid"


def parse(argv: list[str]) -> argparse.Namespace:
    from metrics.fid import METHODS

    p = argument_parser("evaluate", __doc__)
    src = p.add_argument_group("samples and reference")
    src.add_argument("--workdir", help="run directory: sample its checkpoint")
    src.add_argument("--samples", help="samples .npz (arr_0 uint8 NHWC, arr_1 labels)")
    src.add_argument(
        "--dataset",
        help="reference / training dataset: a tfds name, or an .npz file ({split} = the split)",
    )
    src.add_argument("--split", default=None, help="dataset split (default train)")
    src.add_argument("--data-dir", default=None, help="tfds data_dir (default $TFDS_DATA_DIR)")
    src.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="dataset images: central square resized to this size (as the run trained)",
    )
    src.add_argument("--ref-stats", help="reference FID statistics .npz (mu, sigma)")
    src.add_argument("--cache-dir", default=None, help="cache of dataset features / stats")
    out = p.add_argument_group("output")
    out.add_argument("--metrics", default=None, help=f"comma list (default {DEFAULT_METRICS})")
    out.add_argument("--out", help="output JSON")
    out.add_argument("--write-stats", help="write FID statistics of the samples / dataset")
    out.add_argument("--save-samples", help="with --workdir: also write the samples .npz")
    smp = p.add_argument_group("sampling (--workdir)")
    add_sampling_flags(smp, num=10_000)
    m = p.add_argument_group("metric options")
    m.add_argument(
        "--inception-batch", type=int, default=None,
        help="images per Inception call (default: 10 on CPUs, faster there; 50 elsewhere)",
    )  # fmt: skip
    m.add_argument(
        "--fid-method", default="eigh", choices=METHODS,
        help="tr sqrt(S1 S2) by symmetric eigendecompositions (fast), or by scipy's complex "
        "Schur sqrtm as pytorch-fid (its exact steps)",
    )  # fmt: skip
    m.add_argument(
        "--inception-precision", default="highest",
        choices=("highest", "default", "tf32", "tf32x3"),
        help="the Inception convolutions: full float32 (highest; the pytorch-fid agreement "
        "was measured so), the backend's default (TF32 tensor cores on NVIDIA GPUs, as "
        "PyTorch's cuDNN convolutions run by default; float32 on CPUs), tf32: operands "
        "rounded to TF32 on any backend (what the GPU's default computes, measured on a CPU), "
        "or tf32x3: float32 accuracy from three TF32 products per convolution (tensor cores "
        "on NVIDIA GPUs; 3x the work on CPUs)",
    )  # fmt: skip
    m.add_argument("--kid-subsets", type=int, default=100)
    m.add_argument("--kid-subset-size", type=int, default=1000)
    m.add_argument("--pr-k", type=int, default=3)
    m.add_argument("--mem-space", default=None,
                   help="pixel and/or inception (default: both; pixel only on a CPU until the "
                   "training set's Inception features are cached)")  # fmt: skip
    m.add_argument(
        "--delta-m", default=None, help="memorized distance: one, or pixel=D,inception=D"
    )
    m.add_argument("--delta-s", default=None, help="spurious distance (as --delta-m)")
    m.add_argument("--ratio-k", type=int, default=2, help="ratio test: NN1 / mean NN2..k")
    m.add_argument("--ratio-threshold", type=float, default=1 / 3)
    m.add_argument("--effdim-num", type=int, default=16, help="samples for effdim")
    m.add_argument("--effdim-sigma", type=float, default=1e-2, help="noise (t = 1 - sigma)")
    m.add_argument(
        "--effdim-sigmas", default=None, metavar="S1,S2,...",
        help="several noise levels, e.g. 0.01,0.05,0.2,0.5: the dimension of the same samples "
        "at each, and a plot of it against sigma (replaces --effdim-sigma)",
    )  # fmt: skip
    m.add_argument("--effdim-chunk", type=int, default=None, help="Jacobian columns per pass")
    m.add_argument("--swd-projections", type=int, default=256, help="directions of swd")
    add_nll_solver_flags(m)
    m.add_argument(
        "--nll-divergence", default="auto", help="exact, hutchinson or auto (exact up to 16-d)"
    )
    m.add_argument("--nll-probes", type=int, default=1, help="Hutchinson probes")
    add_heldout_num_flag(m)
    m.add_argument(
        "--nll-check", action=argparse.BooleanOptionalAction, default=True,
        help="also integrate finer (a tenth of --nll-tol, twice --nll-steps): nll_fine, "
        "nll_fine_change (the mean per-point change, the error of the reported NLL)",
    )  # fmt: skip
    return p.parse_args(argv[1:])


NLL_CHANGE_WARN = 0.05  # nats per point, mean |log p - log p of the finer solve|


def _check(args, UserError) -> None:
    if args.workdir and args.samples:
        raise UserError("give either --workdir (sample the run) or --samples, not both")
    if not (args.workdir or args.samples or (args.dataset and args.write_stats)):
        raise UserError(
            "nothing to evaluate: give --workdir, --samples, or --dataset with --write-stats"
        )
    if args.samples and not os.path.isfile(args.samples):
        raise UserError(f"samples file {args.samples!r} not found")
    if args.ref_stats and not os.path.isfile(args.ref_stats):
        raise UserError(f"reference statistics {args.ref_stats!r} not found")
    if args.metrics is None and not args.write_stats:
        args.metrics = DEFAULT_METRICS
    if args.metrics and not (args.workdir or args.samples):
        raise UserError("--metrics need samples: give --workdir or --samples")
    at_least = {
        "--num": (args.num, 1), "--batch": (args.batch, 1),
        "--inception-batch": (1 if args.inception_batch is None else args.inception_batch, 1),
        "--kid-subsets": (args.kid_subsets, 1),
        "--kid-subset-size": (args.kid_subset_size, 2), "--pr-k": (args.pr_k, 1),
        "--ratio-k": (args.ratio_k, 2), "--effdim-num": (args.effdim_num, 1),
        "--swd-projections": (args.swd_projections, 1), "--nll-probes": (args.nll_probes, 1),
    }  # fmt: skip
    if args.heldout_num is not None:
        at_least["--heldout-num"] = (args.heldout_num, 0)
    for flag, (value, low) in at_least.items():
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    args.delta_m = _per_space("--delta-m", args.delta_m, UserError)
    args.delta_s = _per_space("--delta-s", args.delta_s, UserError)
    nll_solver_options(args)  # the solver flags' checks
    if not 0.0 < args.effdim_sigma < 1.0:
        raise UserError(f"--effdim-sigma must be in (0, 1), got {args.effdim_sigma}")
    args.effdim_sigmas = _sigmas(args.effdim_sigmas, UserError)
    if args.write_stats and not args.write_stats.endswith(".npz"):
        args.write_stats += ".npz"  # numpy would add it anyway; report the real name
    if args.save_samples and not args.save_samples.endswith(".npz"):
        args.save_samples += ".npz"


def _sigmas(text: str | None, UserError) -> tuple[float, ...] | None:
    """`"0.01,0.1"` -> (0.01, 0.1): each in (0, 1), none repeated."""
    if text is None:
        return None
    try:
        sigmas = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise UserError(f"--effdim-sigmas wants numbers like 0.01,0.1,0.5, got {text!r}") from None
    bad = [s for s in sigmas if not 0.0 < s < 1.0]
    if not sigmas or bad:
        raise UserError(f"--effdim-sigmas must be in (0, 1), got {text!r}")
    if len(set(sigmas)) != len(sigmas):
        raise UserError(f"--effdim-sigmas names a level twice: {text!r}")
    return sigmas


def _per_space(flag: str, text: str | None, UserError):
    """`"0.07"` -> 0.07; `"pixel=0.07,inception=0.1"` -> a dict by space; each > 0."""
    if text is None:
        return None
    from metrics.memorization import DELTAS

    pairs = [p.partition("=") for p in text.split(",") if p.strip()]
    named = all(sep for _, sep, _ in pairs)
    out = {}
    for name, _, value in pairs if named else [("", "", text)]:
        try:
            d = float(value)
        except ValueError:
            raise UserError(
                f"{flag} wants a distance or pixel=D,inception=D, got {text!r}"
            ) from None
        if not d > 0:
            raise UserError(f"{flag} must be > 0 (a distance), got {d}")
        if named and name.strip() not in DELTAS:
            raise UserError(f"{flag}: unknown space {name.strip()!r}; known: {', '.join(DELTAS)}")
        out[name.strip()] = d
    return out if named else out[""]


def _options(args, evaluation):
    return evaluation.Options(
        fid_method=args.fid_method,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        pr_k=args.pr_k,
        mem_spaces=args.mem_space,
        delta_m=args.delta_m,
        delta_s=args.delta_s,
        ratio_k=args.ratio_k,
        ratio_threshold=args.ratio_threshold,
        effdim_num=args.effdim_num,
        effdim_sigma=args.effdim_sigma,
        effdim_sigmas=args.effdim_sigmas,
        effdim_chunk=args.effdim_chunk,
        swd_projections=args.swd_projections,
        inception_batch=args.inception_batch,
        inception_precision=args.inception_precision,
        plot_prefix=os.path.splitext(args.out)[0] if args.out else None,
        heldout_split=args.split or "test",
        heldout_num=args.heldout_num,
        nll_solver=args.nll_solver,
        nll_tol=args.nll_tol,
        nll_steps=args.nll_steps,
        nll_divergence=args.nll_divergence,
        nll_probes=args.nll_probes,
        nll_check=args.nll_check,
        batch=args.batch,
        sampler=args.sampler,
        sample_steps=args.steps,
        cfg_scale=args.cfg,
        seed=args.seed,
    )


def dataset(args):
    """The `--dataset` (`--split`, default train) as a `core.reference.Dataset`, or None."""
    if not args.dataset:
        return None
    from core import reference

    return reference.dataset_from_name(
        args.dataset, args.split or "train", cache_dir=args.cache_dir,
        data_dir=args.data_dir, image_size=args.image_size,
    )  # fmt: skip


def evaluate_workdir(args, names: list[str], ds, *, want_samples: bool | None = None):
    """`core.evaluation.report.evaluate_run` of `--workdir` with these flags ->
    `(result, drawn samples)`."""
    from core import evaluation
    from core.evaluation import report

    return report.evaluate_run(
        args.workdir, names, num=args.num, dataset=ds, split=args.split,
        cache_dir=args.cache_dir, ref_stats=args.ref_stats,
        options=_options(args, evaluation), write_stats=args.write_stats,
        want_samples=want_samples, **sampling_kwargs(args),
    )  # fmt: skip


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    args = parse(argv)
    from core.errors import UserError

    _check(args, UserError)
    from core import evaluation
    from core.evaluation import report

    names = [n.strip() for n in (args.metrics or "").split(",") if n.strip()]
    heldout, sample_metrics = report.split_metrics(names)  # before any sampling or loading
    x = labels = None
    if args.samples:  # the whole file checked, and the metrics against it, before any work
        x, labels = report.check_samples_file(args.samples)
        report.check_metric_inputs(sample_metrics, x.shape[1:], _options(args, evaluation))
    maybe_initialize_distributed()
    import jax

    if "is" in names:
        from models.inception import has_logits

        if not has_logits():
            raise UserError(
                "is (Inception Score) needs the 1008-way logits layer, which these Inception "
                "weights lack (pytorch-fid's .pth has it); drop is from --metrics"
            )
    if heldout and not args.workdir:
        raise UserError(f"{', '.join(heldout)} need the run's network: give --workdir")
    if args.ref_stats:  # read and checked before any sampling or Inception pass
        report.check_ref_stats(args.ref_stats)
    ds = dataset(args)
    if args.workdir:
        want = bool(sample_metrics or args.write_stats or args.save_samples)
        result, drawn = evaluate_workdir(args, names, ds, want_samples=want)
        if args.save_samples and jax.process_index() == 0:
            from core import sampling

            sampling.write_samples(args.save_samples, drawn.samples, drawn.labels)
            result["saved_samples"] = args.save_samples
    else:
        info = {"samples": args.samples} if args.samples else {}
        result = report.evaluate(
            names, samples=x, labels=labels, dataset=ds, ref_stats=args.ref_stats,
            options=_options(args, evaluation), write_stats=args.write_stats,
        )  # fmt: skip
        result.update(info)
    if jax.process_index() != 0:
        return
    # from main's start (imports, device start-up and sampling included; not the interpreter's
    # own start): with fid_seconds, where an evaluation's time goes
    result["wall_seconds"] = time.perf_counter() - start
    write_json(result, args.out)
    change = result.get("nll_fine_change")
    if change is not None and change > NLL_CHANGE_WARN:
        print(f"warning: each point's log-likelihood moved {change:.3f} nats on average "
              f"against a finer solve than {result['nll_solver']}: the NLL is not "
              f"converged; lower --nll-tol (or raise --nll-steps)", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    run(main)

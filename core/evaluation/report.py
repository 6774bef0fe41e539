"""One evaluation as a JSON-ready dict: `evaluate` (metrics of given samples and/or a run's
network) and `evaluate_run` (a run directory: draw its samples, then `evaluate`). The CLIs
`scripts.evaluate` and `scripts.steps_sweep` are thin layers over these."""

import numpy as np

from core.errors import UserError, lookup
from core.evaluation.evaluator import (
    INCEPTION_METRICS,
    Evaluator,
    Options,
    RunNetwork,
    needs_images,
)


def split_metrics(names: list[str]) -> tuple[list[str], list[str]]:
    """`names` checked against `METRICS` -> (held-out metrics, sample metrics)."""
    from core.evaluation import HELDOUT_METRICS, METRICS

    for name in names:
        lookup(METRICS, name, "metric")
    heldout = [n for n in names if n in HELDOUT_METRICS]
    return heldout, [n for n in names if n not in heldout]


def evaluate(
    names: list[str],
    *,
    samples: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    network: RunNetwork | None = None,
    dataset=None,
    ref_stats: str | None = None,
    options: Options | None = None,
    write_stats: str | None = None,
) -> dict:
    """The metrics `names` and, with `write_stats`, the FID statistics of the samples (or,
    without samples, of `dataset`) written there. Held-out metrics run on every process
    (`geo` samples over the whole mesh); the rest only on process 0, and other processes
    get the held-out part alone."""
    import jax

    from metrics import fid as fm

    options = options or Options()
    heldout, sample_metrics = split_metrics(names)
    ev = Evaluator(
        samples, labels=labels, dataset=dataset, ref_stats=ref_stats, network=network,
        options=options,
    )  # fmt: skip
    result = {"inception_precision": options.inception_precision}
    if heldout:
        result.update(ev.run(heldout), **ev.heldout_info)
    if jax.process_index() != 0:
        return result
    if write_stats:
        stats = ev.sample_stats if samples is not None else dataset.stats(
            ev.features, ev.inception_precision
        )  # fmt: skip
        fm.save_stats(write_stats, *stats)
        result["stats"] = write_stats
    if sample_metrics:
        result.update(ev.run(sample_metrics), num_samples=int(len(samples)))
    if names:
        result["metrics"] = list(names)
    if dataset is not None:
        result["reference"] = f"{dataset.name}:{dataset.split}"
    if ref_stats:
        result["ref_stats"] = ref_stats  # FID's reference when given (over the dataset)
    return result


def evaluate_run(
    workdir: str,
    names: list[str],
    *,
    num: int,
    dataset=None,
    split: str | None = None,
    cache_dir: str | None = None,
    ref_stats: str | None = None,
    options: Options | None = None,
    write_stats: str | None = None,
    want_samples: bool | None = None,
    **sampling,
):
    """Restore the run (and draw `num` samples when a metric or `write_stats` needs them,
    or `want_samples`), evaluate `names` against `dataset` (default: the run's own data,
    its `split`), and say how the samples were drawn -> `(result, core.runs.RunSamples)`.
    `sampling`: `core.runs.sample_run`'s keywords (batch_size, seed, step, ema, sampler,
    num_steps, cfg_scale, sample_options)."""
    from core import runs
    from core.experiment import read_data_spec
    from core.reference import run_dataset

    heldout, sample_metrics = split_metrics(names)
    check_metric_inputs(sample_metrics, read_data_spec(workdir)["example_shape"], options)
    if want_samples is None:
        want_samples = bool(sample_metrics or write_stats)
    drawn = runs.sample_run(workdir, num=num if want_samples else None, **sampling)
    if dataset is None:
        dataset = run_dataset(drawn.experiment.data, split, cache_dir=cache_dir)
    network = RunNetwork(drawn.graphdef, drawn.params, drawn.experiment)
    weights = "ema" if sampling.get("ema", True) else "raw"
    info = {"workdir": workdir, "step": drawn.step, "weights": weights}
    if want_samples:  # how they were drawn (the run's sampling unless overridden)
        info.update(drawn.experiment.sampling.record(), seed=sampling.get("seed", 0))
    result = evaluate(
        names, samples=drawn.samples, labels=drawn.labels, network=network, dataset=dataset,
        ref_stats=ref_stats, options=options, write_stats=write_stats,
    )  # fmt: skip
    return {**info, **result}, drawn


def check_samples_file(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(samples, labels or None) of an ADM `.npz` file, checked whole before any work: uint8
    images `[N, H, W, 1 or 3]` (NHWC) or float samples `[N, D]`, finite; labels (`arr_1`)
    integers >= 0, one per sample. Every error names the file's own dtype and shape."""
    from data.arrays import read_npz

    x, labels = read_npz(path)  # an .npz with arr_0 (or x); labels one per example
    found = f"found {x.dtype} of shape {x.shape}"
    if x.ndim == 4:
        if x.shape[-1] not in (1, 3):
            if x.shape[1] in (1, 3):
                raise UserError(
                    f"{path}: arr_0 {x.shape} has its channels first (NCHW); samples are "
                    f"NHWC [N, H, W, C]: store np.transpose(x, (0, 2, 3, 1))"
                )
            raise UserError(f"{path}: images in arr_0 need 1 or 3 channels last, {found}")
        if x.dtype != np.uint8:
            raise UserError(
                f"{path}: images in arr_0 must be uint8 in [0, 255] (the ADM layout), {found}"
                + _to_uint8_hint(x)
            )
    elif x.ndim == 3 and x.dtype == np.uint8:
        raise UserError(f"{path}: arr_0 {x.shape} has no channel axis: store x[..., None]")
    elif x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise UserError(
            f"{path}: arr_0 must be uint8 images [N, H, W, C] or float samples [N, D], {found}"
        )
    elif not np.isfinite(x).all():
        raise UserError(f"{path}: arr_0 holds NaN or infinite values")
    if not len(x):
        raise UserError(f"{path}: arr_0 holds no samples")
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{path}: labels in arr_1 must be integers, found {labels.dtype}")
        if labels.min() < 0:
            raise UserError(f"{path}: labels in arr_1 must be >= 0, found {labels.min()}")
    return (x if x.dtype == np.uint8 else x.astype(np.float32)), labels


def _to_uint8_hint(x: np.ndarray) -> str:
    """How to store float images of this range as uint8."""
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        return ""
    low, high = float(x.min()), float(x.max())
    if low >= 0.0 and high <= 1.0:
        return " in [0, 1]: store (x * 255).round().astype(np.uint8)"
    if low >= -1.0 and high <= 1.0:
        return " in [-1, 1]: store ((x + 1) * 127.5).round().astype(np.uint8)"
    return ""


def check_metric_inputs(names: list[str], example_shape, options: Options | None = None) -> None:
    """Refuse, before any work, sample metrics that need images (Inception features: fid,
    kid, pr, is, memorization in its inception space) for samples of `example_shape`
    (one sample's shape) that are not images `[H, W, 1 or 3]`."""
    from data.arrays import is_image_shape
    from metrics import memorization as mem

    asked = (options or Options()).mem_spaces
    spaces = mem.split_names(asked) if asked is not None else ["pixel"]  # auto: pixel here
    need = [
        n for n in names
        if n in INCEPTION_METRICS or (n == "memorization" and "inception" in spaces)
    ]  # fmt: skip
    if need and not is_image_shape((0, *example_shape)):
        shape = ", ".join(["N", *map(str, example_shape)])
        raise UserError(needs_images(need, f"samples [{shape}]"))


def check_ref_stats(path: str) -> None:
    """A reference statistics file, read and checked before any work: pytorch-fid's `mu`
    and `sigma` of the Inception pool features."""
    from metrics import fid as fm
    from models.inception import FEATURE_DIM

    mu, _ = fm.load_stats(path)
    if len(mu) != FEATURE_DIM:
        raise UserError(
            f"reference statistics {path} have {len(mu)} dimensions, not the {FEATURE_DIM} of "
            f"Inception features (scripts.evaluate --write-stats writes them)"
        )

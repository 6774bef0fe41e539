"""One evaluation as a JSON-ready dict: `evaluate` (metrics of given samples and/or a run's
network) and `evaluate_run` (a run directory: draw its samples, then `evaluate`). The CLIs
`scripts.evaluate` and `scripts.steps_sweep` are thin layers over these."""

import numpy as np

from core.errors import UserError, lookup
from core.evaluation.evaluator import Evaluator, Options, RunNetwork


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
        result.update(ev.run(heldout))
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
    from core.reference import run_dataset

    heldout, sample_metrics = split_metrics(names)
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
    """(samples, labels or None) of an ADM `.npz` file: images must be uint8."""
    from data.arrays import ArraySource

    x = ArraySource(path).x  # checks the layout, dtype and shape
    if x.ndim == 4 and x.dtype != np.uint8:
        raise UserError(
            f"{path}: images in arr_0 must be uint8 in [0, 255] (the ADM layout), "
            f"got {x.dtype} (float arrays are for non-image samples)"
        )
    with np.load(path) as f:
        labels = f["arr_1"] if "arr_1" in f.files else None
    return x, labels

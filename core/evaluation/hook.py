"""The in-training evaluation: `make_eval_hook`, a `hook(step, state)` for
`core.trainer.train` (the trainer imports it only when `training.eval_every > 0`)."""

import numpy as np

from core import plots
from core.errors import UserError
from core.evaluation.evaluator import Evaluator
from core.experiment import Experiment, data_spec
from core.reference import run_dataset
from metrics import memorization as mem


def make_eval_hook(
    experiment: Experiment,
    workdir: str,
    *,
    writer=None,
    mesh=None,
    source=None,
    graphdef=None,
    spec: dict | None = None,
    frozen=None,
):
    """`hook(step, state)` for `core.trainer.train`: every `training.eval_every` steps (0 =
    never) draw `evaluation.num_samples` samples with the EMA weights and write cheap
    memorization numbers (`metrics.memorization.cheap_report` against at most
    `evaluation.max_train` training examples) and, with `evaluation.fid`, FID of
    `evaluation.num_fid` samples against the training split (statistics cached) to
    `writer` (the run's MetricWriter), under `eval/`. Objects the trainer already has
    (mesh, data source, graphdef, data spec, frozen networks) can be passed in; otherwise
    they are built."""
    import jax

    from core import sharding
    from core.sampling import Generator
    from core.writer import MetricWriter

    every = experiment.training.eval_every
    if every <= 0:
        return lambda step, state: None
    e, seed = experiment.evaluation, experiment.training.seed
    mesh = mesh or experiment.mesh.make()
    source = source or experiment.data.source()
    spec = spec or data_spec(source)
    if graphdef is None:
        graphdef, _ = experiment.network.abstract()
    if e.fid and len(spec["example_shape"]) != 3:
        raise UserError("config.eval.fid needs image data; set config.eval.fid=False")
    num = max(e.num_samples, e.num_fid if e.fid else 0)
    batch = sharding.sample_batch(mesh, e.batch_size, num)
    if frozen is None:
        from core.runs import restore_frozen

        frozen = restore_frozen(experiment, mesh)
    sampler = Generator(experiment, graphdef, spec, mesh, num=num, batch_size=batch, frozen=frozen)
    key = jax.random.fold_in(jax.random.key(seed), 2**30 + 1)  # fixed eval noise
    rows = mem.subsample(np.arange(source.num_examples), e.max_train, seed)
    train = source.__getitems__(rows)["x"]  # float32, images in [-1, 1]
    ds = run_dataset(experiment.data, e.ref_split)
    writer = writer or MetricWriter(workdir, enabled=jax.process_index() == 0)

    def hook(step: int, state) -> None:
        if step % every:
            return
        x, _ = sampler(state.ema, key)
        if jax.process_index() != 0:
            return
        out = mem.cheap_report(x[: e.num_samples], train, max_train=e.max_train)
        if e.fid:
            ev = Evaluator(plots.to_uint8(x[: e.num_fid]), dataset=ds)
            fid = ev.run(["fid"])  # fid and fid_seconds as scalars; the method is the default
            out.update({k: v for k, v in fid.items() if isinstance(v, float | int)})
        writer.write(step, {f"eval/{k}": v for k, v in out.items()})

    return hook

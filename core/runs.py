"""A run directory read back: its experiment, data spec and weights, the frozen networks of
other runs it names, and samples drawn from it (what `scripts.sample` and
`scripts.evaluate --workdir` do).
"""

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import numpy as np

from core import sharding
from core.checkpoint import open_for_reading
from core.config import from_json
from core.errors import UserError
from core.experiment import Experiment, Frozen, read_data_spec


def load_config(workdir: str):
    """The ConfigDict of a run's `config.json`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"no config.json in {workdir}: not a driftlab run directory")
    with open(path) as f:
        return from_json(f.read())


def load_run(workdir: str, step: int | None = None, ckpt=None) -> tuple[Experiment, dict]:
    """(experiment, data spec) of a run directory written by the trainer: the experiment
    that trained checkpoint `step` (its recorded config; the run's config.json for a step
    saved without one, and when `step` is None). `ckpt`: the run's open `Checkpoints`."""
    config = load_config(workdir)
    where = f"{workdir}/config.json"
    if step is not None:
        reader = ckpt or open_for_reading(workdir)
        try:
            saved = reader.saved_config(step)
        finally:
            if ckpt is None:
                reader.close()
        if saved is not None:
            config = from_json(json.dumps(saved))
            where = f"the config saved with step {step} of {workdir}"
    try:
        experiment = Experiment.from_config(config)
    except (AttributeError, KeyError) as e:  # a config.json missing a section
        raise UserError(f"{where} is not a driftlab config: no {e}") from None
    return experiment, read_data_spec(workdir)


def placed_like_params(experiment: Experiment, abstract, mesh):
    """`abstract` params as `ShapeDtypeStruct`s sharded on `mesh` by the FSDP rule."""
    shardings = sharding.state_shardings(mesh, abstract, experiment.mesh.fsdp_min_size)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def restore_network(
    workdir: str, experiment: Experiment, mesh, *, step: int | None = None, ema: bool = True
):
    """(graphdef, params placed on `mesh`, step) from the given checkpoint or the newest
    intact one (`Checkpoints.restore_intact`: a damaged newer step is skipped, saying so)."""
    ckpt = open_for_reading(workdir)
    graphdef, abstract = experiment.network.abstract()
    target = placed_like_params(experiment, abstract, mesh)
    try:
        step, (_, params) = ckpt.restore_intact(
            lambda s: ckpt.restore_weights(target, step=s, ema=ema),
            step=step,
            items=("ema" if ema else "params",),
        )
    finally:
        ckpt.close()
    return graphdef, params, step


@dataclasses.dataclass
class RestoredRun:
    """A checkpoint of a run restored with the experiment that trained it."""

    experiment: Experiment
    spec: dict
    graphdef: object
    params: object
    step: int


def restore_run(
    workdir: str,
    mesh,
    *,
    step: int | None = None,
    ema: bool = True,
    adjust: Callable[[Experiment], Experiment] = lambda e: e,
) -> RestoredRun:
    """The given checkpoint, or the newest intact one, restored on `mesh` together with
    the experiment that trained it (its recorded config), after `adjust` (e.g. sampling
    overrides) is applied to that experiment."""
    ckpt = open_for_reading(workdir)

    def restore(s: int) -> RestoredRun:
        experiment, spec = load_run(workdir, s, ckpt)
        experiment = adjust(experiment)
        graphdef, abstract = experiment.network.abstract()
        target = placed_like_params(experiment, abstract, mesh)
        _, params = ckpt.restore_weights(target, step=s, ema=ema)
        return RestoredRun(experiment, spec, graphdef, params, s)

    try:
        _, restored = ckpt.restore_intact(
            restore, step=step, items=("ema" if ema else "params",)
        )
    finally:
        ckpt.close()
    return restored


@dataclasses.dataclass(frozen=True)
class FrozenNets:
    """The frozen networks of an experiment: by name, their graphdefs, their params (on the
    mesh, never updated) and what was restored (`frozen`: the steps resolved)."""

    graphdefs: dict
    params: dict
    frozen: tuple[Frozen, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.graphdefs)


NO_FROZEN = FrozenNets({}, {})


def resolve_frozen(experiment: Experiment) -> tuple[Frozen, ...]:
    """Each frozen network's run checked and its step fixed (the newest when unset), as a
    new run records them: a missing run, checkpoint or step is one UserError naming it."""
    out = []
    for f in experiment.frozen:
        where = f"frozen.{f.name}.workdir={f.workdir!r}"
        if not os.path.isdir(f.workdir):
            raise UserError(f"{where}: no such run directory")
        if not os.path.exists(os.path.join(f.workdir, "config.json")):
            raise UserError(f"{where}: no config.json there (not a driftlab run directory)")
        try:
            ckpt = open_for_reading(f.workdir)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        try:  # the given step, or the newest whose files are intact
            item = "ema" if f.ema else "params"
            step, _ = ckpt.restore_intact(lambda s: None, step=f.step, items=(item,))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        finally:
            ckpt.close()
        out.append(dataclasses.replace(f, workdir=os.path.abspath(f.workdir), step=step))
    return tuple(out)


def abstract_frozen(experiment: Experiment) -> tuple[dict, dict]:
    """(graphdefs, abstract params) of the frozen networks, by name, from their runs'
    configs; a run whose checkpoint does not fit its own config is a UserError."""
    graphdefs, abstracts = {}, {}
    for f in experiment.frozen:
        other, _ = load_run(f.workdir)
        graphdefs[f.name], abstracts[f.name] = other.network.abstract()
    return graphdefs, abstracts


def restore_frozen(experiment: Experiment, mesh) -> FrozenNets:
    """Restore every network of `experiment.frozen` onto `mesh`, sharded like parameters."""
    if not experiment.frozen:
        return NO_FROZEN
    resolved = resolve_frozen(experiment)
    graphdefs, abstracts = abstract_frozen(experiment)
    params = {}
    for f in resolved:
        ckpt = open_for_reading(f.workdir)
        try:
            wrong = ckpt.mismatches(f.step, abstracts[f.name])
            if wrong:
                raise UserError(
                    f"frozen.{f.name}: the step-{f.step} checkpoint of {f.workdir} does not fit "
                    f"that run's own config.json ({'; '.join(wrong[:2])})"
                )
            target = placed_like_params(experiment, abstracts[f.name], mesh)
            _, params[f.name] = ckpt.restore_weights(target, step=f.step, ema=f.ema)
        finally:
            ckpt.close()
    return FrozenNets(graphdefs, params, resolved)


@dataclasses.dataclass
class RunSamples:
    """What `sample_run` returns: the samples (float32 on the host, None when not drawn),
    their labels (None if unconditional), the run's network and the checkpoint step."""

    samples: np.ndarray | None
    labels: np.ndarray | None
    experiment: Experiment
    graphdef: object
    params: object
    step: int
    spec: dict


def sample_run(
    workdir: str,
    *,
    num: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    step: int | None = None,
    ema: bool = True,
    sampler: str | None = None,
    num_steps: int | None = None,
    cfg_scale: float | None = None,
    cfg_schedule: str | None = None,
    cfg_interval=None,
    sample_options: dict | None = None,
    label: int | None = None,
    mesh=None,
) -> RunSamples:
    """Restore a run's weights (EMA unless `ema=False`) on `mesh` (default: all devices) and,
    unless `num` is None, draw `num` samples in batches of `batch_size` rounded up to a multiple of
    the devices, with the run's sampling where `sampler`, `num_steps`, `cfg_scale`,
    `cfg_schedule`, `cfg_interval` (the guidance), `sample_options` do not override it."""
    from core import sampling

    adjust = lambda experiment: experiment.with_sampling(
        sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
        cfg_interval=cfg_interval, options=sample_options,
    )  # fmt: skip
    mesh = mesh or sharding.make_mesh()
    run = restore_run(workdir, mesh, step=step, ema=ema, adjust=adjust)
    experiment, spec, graphdef, params, step = (
        run.experiment, run.spec, run.graphdef, run.params, run.step
    )
    x = labels = None
    if num is not None:
        frozen = restore_frozen(experiment, mesh)
        batch = sharding.sample_batch(mesh, batch_size, num)
        x, labels = sampling.draw_samples(
            experiment, graphdef, params, spec, mesh, num=num, batch_size=batch, seed=seed,
            label=label, frozen=frozen,
        )  # fmt: skip
    return RunSamples(x, labels, experiment, graphdef, params, step, spec)

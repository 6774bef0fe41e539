"""One trainer for every family: config -> sharded jitted steps -> checkpoints and logs.

The loss decides what is trained (velocity net, flow, ...); the trainer only knows
`loss(net, batch, key, **extras) -> (per_example, metrics)` and a network split once into
(graphdef, params). Per step the key is `fold_in(key(seed), step)`, the batch is a pure
function of (seed, step), so a resumed run equals an uninterrupted one.
"""

import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict
from tqdm import tqdm

import losses
from core import experiment, plots, sampling, sharding
from core.checkpoint import Checkpoints
from core.config import to_json
from core.errors import TrainingDiverged, UserError
from core.train_state import TrainState, init_state, learning_rate, make_optimizer
from core.writer import MetricWriter
from data.pipeline import Batches, prefetch

Hook = Callable[[int, TrainState], None]


def make_train_step(
    graphdef,
    loss_fn,
    tx: optax.GradientTransformation,
    *,
    ema_decay: float,
    seed: int,
    ema_warmup: bool = False,
    teacher_ema_decay: float = 0.0,
) -> Callable:
    """`step(state, batch) -> (state, metrics)`; a non-finite loss, gradient or update
    leaves the state unchanged (but for `step`) and is reported as `nonfinite = 1`.

    The EMA decays by `ema_decay`, or with `ema_warmup` by `min(ema_decay, (1 + n) / (10 + n))`
    at update `n` (0.1 at the first update), so that a short run's EMA forgets the
    initialisation (with a fixed 0.9999 it keeps weight 0.9999^n on it: 37 % after 10k).
    A state with a `teacher_ema` updates it the same way with `teacher_ema_decay`. The
    loss gets each frozen network its signature names (`losses.FROZEN_NETS`: `ema_net`
    from `state.ema`, `teacher_ema_net` from `state.teacher_ema`) that the state holds."""
    wanted = losses.frozen_nets(loss_fn)
    base_key = jax.random.key(seed)

    def rate(decay, step):
        """`1 - decay` at update `step` (with the warm-up if asked)."""
        decay = jnp.asarray(decay, jnp.float32)
        if ema_warmup:
            n = step.astype(jnp.float32)
            decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
        return 1.0 - decay

    def step(state: TrainState, batch: dict):
        key = jax.random.fold_in(base_key, state.step)
        extras = _frozen(graphdef, {"ema": state.ema, "teacher_ema": state.teacher_ema}, wanted)

        def objective(params):
            per_example, metrics = loss_fn(nnx.merge(graphdef, params), batch, key, **extras)
            return jnp.mean(per_example), metrics

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optax.incremental_update(params, state.ema, rate(ema_decay, state.step))
        teacher_ema = state.teacher_ema
        if teacher_ema is not None:  # static: the state's structure
            teacher_ema = optax.incremental_update(
                params, teacher_ema, rate(teacher_ema_decay, state.step)
            )
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            ema=keep(ema, state.ema),
            opt_state=keep(opt_state, state.opt_state),
            teacher_ema=None if teacher_ema is None else keep(teacher_ema, state.teacher_ema),
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite": 1.0 - ok.astype(jnp.float32),
        }
        return new_state, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)

    return step


def _frozen(graphdef, trees: dict, wanted: Sequence[str]) -> dict:
    """`{"ema_net": net(trees["ema"]), ...}` for each name in `wanted` whose tree (the name
    without `_net`: a TrainState field) is kept (not None)."""
    kept = {name: trees[name.removesuffix("_net")] for name in wanted}
    return {name: nnx.merge(graphdef, tree) for name, tree in kept.items() if tree is not None}


class _Run:
    """Everything `train` sets up from the config, before the loop."""

    def __init__(self, config: ConfigDict, workdir: str, devices=None):
        self.config, self.workdir = config, workdir
        self.main = jax.process_index() == 0
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
        sharding.check_batch_size(self.mesh, config.batch_size)
        self.source = experiment.build_source(config)
        self.spec = experiment.data_spec(self.source)
        experiment.check_classes(config, self.spec)
        self.factory = experiment.network_factory(config)
        self.graphdef, abstract_params = experiment.abstract_network(self.factory, config.seed)
        self.loss_fn = experiment.build_loss(config)
        self.teacher_ema = wants_teacher_ema(config, self.loss_fn)
        self.tx = make_optimizer(**config.optim, total_steps=config.total_steps)
        abstract_state = jax.eval_shape(self._init_state, abstract_params)
        self.shardings = sharding.state_shardings(
            self.mesh, abstract_state, config.mesh.fsdp_min_size
        )
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            self.shardings,
        )
        self._check_data_fits(abstract_params)

    def _check_data_fits(self, abstract_params) -> None:
        """Trace the loss on a batch shaped like the real one (cheap: nothing is computed)."""
        example = self.source.__getitems__(np.arange(1))
        n = self.config.batch_size
        batch = {k: jax.ShapeDtypeStruct((n, *v.shape[1:]), v.dtype) for k, v in example.items()}
        run_loss = lambda p, b: self.loss_fn(
            nnx.merge(self.graphdef, p), b, jax.random.key(0), **self._extras(p)
        )
        try:
            jax.eval_shape(run_loss, abstract_params, batch)
        except UserError:
            raise  # already says what is wrong (e.g. a batch too small for a loss)
        except (ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"network {self.config.model.name!r} cannot train on data "
                f"{self.config.data.name!r} of example shape {tuple(self.spec['example_shape'])}"
                f": {first}"
            ) from e

    def _init_state(self, params) -> TrainState:
        return init_state(params, self.tx, teacher_ema=self.teacher_ema)

    def _extras(self, params):
        """The frozen networks the train step passes, all made from `params` (for tracing)."""
        trees = {"ema": params, "teacher_ema": params if self.teacher_ema else None}
        return _frozen(self.graphdef, trees, losses.frozen_nets(self.loss_fn))

    def init_or_restore(self, ckpt: Checkpoints, workdir: str) -> TrainState:
        latest = ckpt.latest_step()
        if latest is not None:
            wrong = ckpt.mismatches(latest, self.abstract_state.params)
            if wrong:  # checked before restoring: a failed orbax restore is noisy
                more = f" and {len(wrong) - 2} more" if len(wrong) > 2 else ""
                raise UserError(
                    f"cannot resume {workdir} from its step-{latest} checkpoint: it does not "
                    f"fit this config ({_config_changes(workdir, self.config)}; weights: "
                    f"{'; '.join(wrong[:2])}{more}); resume with the run's own config or "
                    "train in a new workdir"
                )
            return ckpt.restore(latest, self.abstract_state)
        seed = self.config.seed
        init = lambda: self._init_state(experiment.init_params(self.factory, seed))
        return jax.jit(init, out_shardings=self.shardings)()

    def jit_step(self) -> Callable:
        step = make_train_step(
            self.graphdef,
            self.loss_fn,
            self.tx,
            ema_decay=self.config.ema_decay,
            ema_warmup=bool(self.config.get("ema_warmup", False)),
            teacher_ema_decay=self.config.get("teacher_ema_decay", 0.0),
            seed=self.config.seed,
        )
        batch_sharding = sharding.batch_sharding(self.mesh)
        return jax.jit(
            step,
            donate_argnums=0,
            in_shardings=(self.shardings, batch_sharding),
            out_shardings=(self.shardings, sharding.replicated(self.mesh)),
        )

    def batches(self, start_step: int):
        b = Batches(
            self.source,
            global_batch_size=self.config.batch_size,
            seed=self.config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            random_flip=self.config.data.random_flip,
        )
        return prefetch(b.iterate(start_step), 2, lambda x: sharding.place_batch(x, self.mesh))


def wants_teacher_ema(config: ConfigDict, loss_fn) -> bool:
    """Whether the run keeps a teacher EMA (`teacher_ema_decay > 0`); a decay outside
    [0, 1) or one set for a loss that cannot use it is a UserError."""
    decay = float(config.get("teacher_ema_decay", 0.0))
    if not 0.0 <= decay < 1.0:
        raise UserError(f"teacher_ema_decay={decay} must be in [0, 1) (0 = no teacher EMA)")
    if decay > 0 and "teacher_ema_net" not in losses.frozen_nets(loss_fn):
        raise UserError(
            f"teacher_ema_decay={decay} keeps a teacher EMA, but loss {config.loss.name!r} "
            "takes none (the shortcut loss with loss.teacher='teacher_ema' does); "
            "set teacher_ema_decay=0"
        )
    return decay > 0


def _config_changes(workdir: str, config: ConfigDict, limit: int = 6) -> str:
    """`"model.hidden 32 -> 64, ..."`: how `config` differs from the run's `config.json`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return "the run has no config.json to compare with"
    with open(path) as f:
        old = _flat(json.load(f))
    new = _flat(json.loads(to_json(config)))
    changed = [
        f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if not changed:
        return "same config.json: the checkpoint itself differs"
    more = f", and {len(changed) - limit} more" if len(changed) > limit else ""
    return "changed: " + ", ".join(changed[:limit]) + more


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _prepare_workdir(config: ConfigDict, workdir: str, main: bool) -> None:
    os.makedirs(workdir, exist_ok=True)
    if not main:
        return
    path = os.path.join(workdir, "config.json")
    text = to_json(config)
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:  # keep the earlier config of a resumed run, never overwrite it
            os.replace(path, os.path.join(workdir, f"config.{int(time.time())}.json"))
    with open(path, "w") as f:
        f.write(text)


def train(
    config: ConfigDict, workdir: str, *, hooks: Sequence[Hook] = (), devices=None
) -> TrainState:
    """Train (or resume) the experiment `config` in `workdir`; returns the final state.

    `hooks` are called as `hook(step, state)` after every step; `devices` (default: all)
    are the devices the mesh is built from. With `config.eval_every`, the evaluation hook
    of `core.evaluation` runs too.
    """
    run = _Run(config, workdir, devices)
    ckpt = Checkpoints(workdir, max_to_keep=config.keep_ckpts)
    try:
        # restore first: a resume that does not fit this config changes nothing on disk
        state = run.init_or_restore(ckpt, workdir)
    except BaseException:
        ckpt.close()
        raise
    _prepare_workdir(config, workdir, run.main)
    if run.main:
        experiment.write_data_spec(workdir, run.spec)
    writer = MetricWriter(workdir, enabled=run.main)
    try:
        if config.get("eval_every"):
            from core.evaluation import make_eval_hook  # imports the metrics: when asked

            hook = make_eval_hook(
                config,
                workdir,
                writer=writer,
                mesh=run.mesh,
                source=run.source,
                graphdef=run.graphdef,
                spec=run.spec,
            )
            hooks = (*hooks, hook)
        start = int(jax.device_get(state.step))
        writer.truncate_after(start)
        state = _loop(run, state, start, ckpt, writer, hooks)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    return state


def _every(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def _loop(
    run: _Run,
    state: TrainState,
    start: int,
    ckpt: Checkpoints,
    writer: MetricWriter,
    hooks: Sequence[Hook],
) -> TrainState:
    config = run.config
    step_fn = run.jit_step()
    grid = _SampleGrid(run) if config.sample_every else None
    metrics_log = _MetricsLog(config, writer, ckpt, start)
    bar = tqdm(
        total=config.total_steps,
        initial=start,
        disable=not run.main,
        dynamic_ncols=True,
        mininterval=1.0,
        desc="train",
    )
    budget = _Budget(config.get("train_seconds", 0.0), config.log_every)
    eval_every = int(config.get("eval_every", 0) or 0)
    step = start
    with run.batches(start) as batches, bar:
        for step in range(start + 1, config.total_steps + 1):
            state, metrics = step_fn(state, next(batches))
            metrics_log.add(metrics)
            bar.update(1)
            last = step == config.total_steps or budget.spent(step)
            if _every(step, config.ckpt_every, last):
                metrics_log.check_finite(step)  # before saving: never save past a NaN
                ckpt.save(state)
            # evaluation steps log too: their numbers join the line with the step's loss
            if _every(step, config.log_every, last) or _every(step, eval_every, False):
                bar.set_postfix(loss=f"{metrics_log.write(step):.4g}")
            if grid is not None and _every(step, config.sample_every, last):
                grid.write(state, step, writer, final=last)
            for hook in hooks:
                hook(step, state)
            if last:
                break
    if step < config.total_steps and run.main:
        print(
            f"train_seconds={config.train_seconds:g} spent: stopped at step {step} of "
            f"{config.total_steps} (checkpoint saved; run again to go on)"
        )
    return state


class _Budget:
    """The wall-clock budget `train_seconds` (0 = none), counted from the start of the loop
    (the first step's compilation included). Every process must stop at the same step: with
    several, process 0's clock decides, read at `log_every` steps only (a broadcast each)."""

    def __init__(self, seconds: float, log_every: int):
        self.seconds = float(seconds or 0.0)
        self.every = 1 if jax.process_count() == 1 else max(int(log_every), 1)
        self.t0 = time.monotonic()

    def spent(self, step: int) -> bool:
        if self.seconds <= 0 or step % self.every:
            return False
        over = time.monotonic() - self.t0 >= self.seconds
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            over = bool(multihost_utils.broadcast_one_to_all(np.int32(over)))
        return over


class _MetricsLog:
    """Sums step metrics on device; averages, checks and writes them every `log_every`."""

    def __init__(self, config: ConfigDict, writer: MetricWriter, ckpt: Checkpoints, start: int):
        self.config, self.writer, self.ckpt = config, writer, ckpt
        self.sums, self.first, self.t0 = None, start, time.perf_counter()
        self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

    def add(self, metrics: dict) -> None:
        self.sums = metrics if self.sums is None else self._add(self.sums, metrics)

    def _means(self, step: int) -> dict:
        return {k: float(v) / (step - self.first) for k, v in jax.device_get(self.sums).items()}

    def check_finite(self, step: int) -> dict:
        means = self._means(step)
        if means["nonfinite"] > 0:
            good = self.ckpt.latest_step()
            where = f"step {good} in {self.ckpt.directory}" if good is not None else "none"
            raise TrainingDiverged(
                f"loss became NaN/inf between steps {self.first + 1} and {step}; training "
                f"stopped (bad updates were not applied). Last good checkpoint: {where}"
            )
        return means

    def write(self, step: int) -> float:
        """Write the means since the last write; returns the mean loss."""
        means = self.check_finite(step)
        del means["nonfinite"]
        elapsed, n = time.perf_counter() - self.t0, step - self.first
        means.update(
            # the rate of the update that made `step` (optax counts updates from 0)
            lr=learning_rate(self.config.optim, self.config.total_steps, step - 1),
            steps_per_sec=n / elapsed,
            examples_per_sec=n * self.config.batch_size / elapsed,
        )
        self.writer.write(step, means)
        self.sums, self.first, self.t0 = None, step, time.perf_counter()
        return means["loss"]


class _SampleGrid:
    """Periodic PNG of samples from the EMA weights, with fixed noise (and conditions):
    `core.sampling.Generator`, compiled once for the run."""

    def __init__(self, run: _Run):
        self.run = run
        cfg_ = run.config
        shape = tuple(run.spec["example_shape"])
        kind = cfg_.sample.plot
        self.kind = ("grid" if len(shape) == 3 else "scatter") if kind == "auto" else kind
        num = int(cfg_.sample.num)
        n_ref = min(num * 8, run.source.num_examples)
        reference = run.source.__getitems__(np.arange(n_ref))
        self.reference = None if self.kind == "grid" else reference["x"]
        conds = None
        if cfg_.model.get("cond_dim", 0):  # condition embeddings: those of the first examples
            conds = reference["cond"][np.arange(num) % n_ref]
        batch = sharding.sample_batch(run.mesh, num, num)  # one call
        self.generate = sampling.Generator(
            run.graphdef, cfg_, run.spec, run.mesh, num=num, batch_size=batch, conds=conds
        )
        self.key = jax.random.fold_in(jax.random.key(cfg_.seed), 2**30)

    def write(self, state: TrainState, step: int, writer: MetricWriter, final: bool) -> None:
        x, _ = self.generate(state.ema, self.key)  # every process takes part
        if not self.run.main:
            return
        path = os.path.join(self.run.workdir, "samples", f"step_{step:08d}.png")
        picture = plots.PLOTS[self.kind](x, self.reference, path, f"step {step}")
        writer.image(step, "samples", picture)
        if final:
            path = os.path.join(self.run.workdir, "samples.png")
            plots.PLOTS[self.kind](x, self.reference, path, "final")

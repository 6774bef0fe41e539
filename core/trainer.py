"""One trainer for every family: experiment -> sharded jitted steps -> checkpoints and logs.

The loss decides what is trained (velocity net, flow, ...); the trainer only knows
`loss(net, batch, key, **extras) -> (per_example, metrics)` and a network split once into
(graphdef, params). `TrainSetup` is what the trainer and the benchmark share. Per step the
key is `fold_in(key(seed), step)`, the batch is a pure function of (seed, step), so a
resumed run equals an uninterrupted one.
"""

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import losses
from core import plots, runs, sampling, sharding
from core.checkpoint import Checkpoints, items_of
from core.errors import TrainingDiverged, TrainingInterrupted, UserError
from core.experiment import Experiment, Training, data_spec, write_data_spec
from core.train_state import TrainState, init_state, learning_rate, make_optimizer
from core.workdir import WorkdirLock, make_writable
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
    frozen_graphdefs: dict | None = None,
) -> Callable:
    """`step(state, batch, frozen=None) -> (state, metrics)`; a non-finite loss, gradient or
    update leaves the state unchanged (but for `step`) and is reported as `nonfinite = 1`.

    The EMA decays by `ema_decay`, or with `ema_warmup` by `min(ema_decay, (1 + n) / (10 + n))`
    at update `n` (0.1 at the first update), so that a short run's EMA forgets the
    initialisation (with a fixed 0.9999 it keeps weight 0.9999^n on it: 37 % after 10k).
    A state with a `teacher_ema` updates it the same way with `teacher_ema_decay`. The
    loss gets each frozen network its signature names (`losses.FROZEN_NETS`: `ema_net`
    from `state.ema`, `teacher_ema_net` from `state.teacher_ema`) that the state holds, and
    each network of other runs as `<name>_net` (`frozen`: name -> params, never updated;
    `frozen_graphdefs`: name -> graphdef)."""
    wanted = losses.frozen_nets(loss_fn)
    frozen_graphdefs = frozen_graphdefs or {}
    base_key = jax.random.key(seed)

    def rate(decay, step):
        """`1 - decay` at update `step` (with the warm-up if asked)."""
        decay = jnp.asarray(decay, jnp.float32)
        if ema_warmup:
            n = step.astype(jnp.float32)
            decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
        return 1.0 - decay

    def step(state: TrainState, batch: dict, frozen: dict | None = None):
        key = jax.random.fold_in(base_key, state.step)
        extras = _frozen(graphdef, {"ema": state.ema, "teacher_ema": state.teacher_ema}, wanted)
        extras.update(_other_runs(frozen_graphdefs, frozen or {}))

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


def _other_runs(graphdefs: dict, params: dict) -> dict:
    """`{"<name>_net": network}` of the frozen networks of other runs."""
    return {f"{name}_net": nnx.merge(graphdefs[name], p) for name, p in params.items()}


class TrainSetup:
    """What the trainer and the benchmark share, built from the experiment: the network
    split once, the loss, the optimizer, the state's shardings on `mesh`, the frozen
    networks of other runs, and the jitted step (`jit_step`)."""

    def __init__(self, experiment: Experiment, mesh, frozen: runs.FrozenNets = runs.NO_FROZEN):
        self.experiment, self.mesh, self.frozen = experiment, mesh, frozen
        t = experiment.training
        sharding.check_batch_size(mesh, t.batch_size)
        self.graphdef, self.abstract_params = experiment.network.abstract(t.seed)
        self.loss_fn = experiment.loss.fn
        _check_frozen_keywords(experiment, self.loss_fn)
        self.tx = make_optimizer(**t.optim, total_steps=t.total_steps)
        abstract_state = jax.eval_shape(self.init_state, self.abstract_params)
        self.shardings = sharding.state_shardings(
            mesh, abstract_state, experiment.mesh.fsdp_min_size
        )
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            self.shardings,
        )

    def init_state(self, params) -> TrainState:
        return init_state(params, self.tx, teacher_ema=self.experiment.keeps_teacher_ema)

    def fresh_state(self) -> TrainState:
        """The initial state, initialised directly in its shardings."""
        seed = self.experiment.training.seed
        init = lambda: self.init_state(self.experiment.network.init(seed))
        return jax.jit(init, out_shardings=self.shardings)()

    def extras(self, params) -> dict:
        """The keyword networks the step passes to the loss, all made from `params` but the
        frozen ones (for tracing)."""
        teacher = params if self.experiment.keeps_teacher_ema else None
        trees = {"ema": params, "teacher_ema": teacher}
        out = _frozen(self.graphdef, trees, losses.frozen_nets(self.loss_fn))
        out.update(_other_runs(self.frozen.graphdefs, self.frozen.params))
        return out

    def jit_step(self) -> Callable:
        """`step(state, batch) -> (state, metrics)`, jitted with the state's and the batch's
        shardings, the state donated, the frozen networks passed as arguments."""
        t = self.experiment.training
        step = make_train_step(
            self.graphdef,
            self.loss_fn,
            self.tx,
            ema_decay=t.ema_decay,
            ema_warmup=t.ema_warmup,
            teacher_ema_decay=t.teacher_ema_decay,
            seed=t.seed,
            frozen_graphdefs=self.frozen.graphdefs,
        )
        frozen_shardings = jax.tree.map(lambda a: a.sharding, self.frozen.params)
        jitted = jax.jit(
            step,
            donate_argnums=0,
            in_shardings=(self.shardings, sharding.batch_sharding(self.mesh), frozen_shardings),
            out_shardings=(self.shardings, sharding.replicated(self.mesh)),
        )
        frozen = self.frozen.params
        return lambda state, batch: jitted(state, batch, frozen)


def _check_frozen_keywords(experiment: Experiment, loss_fn) -> None:
    """Every frozen network must be taken by the loss (as `<name>_net`), and every
    `*_net` the loss requires must be configured."""
    import inspect

    params = inspect.signature(loss_fn).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    names = {f.name for f in experiment.frozen}
    for name in sorted(names):
        if f"{name}_net" not in params and not takes_any:
            raise UserError(
                f"frozen.{name} is configured but loss {experiment.loss.name!r} takes no "
                f"{name}_net; remove frozen.{name}"
            )
    for key, p in params.items():
        needed = p.kind == p.KEYWORD_ONLY and p.default is p.empty and key.endswith("_net")
        if needed and key not in losses.FROZEN_NETS and key.removesuffix("_net") not in names:
            raise UserError(
                f"loss {experiment.loss.name!r} needs the frozen network {key}: set "
                f"frozen.{key.removesuffix('_net')}.workdir to the run that trained it"
            )


class _Run:
    """Everything `train` sets up before the loop: the setup, the data, the run directory."""

    def __init__(self, experiment: Experiment, workdir: str, devices=None):
        self.experiment, self.workdir = experiment, workdir
        self.main = jax.process_index() == 0
        mesh = experiment.mesh.make(devices)
        sharding.check_batch_size(mesh, experiment.training.batch_size)
        self.source = experiment.data.source()
        self.spec = data_spec(self.source)
        experiment.conditioning.check_data(experiment.data.name, self.spec)
        frozen = runs.restore_frozen(experiment, mesh)
        self.setup = TrainSetup(experiment, mesh, frozen)
        self.mesh, self.graphdef = mesh, self.setup.graphdef
        self._check_data_fits()

    def _check_data_fits(self) -> None:
        """Trace the loss on a batch shaped like the real one (cheap: nothing is computed)."""
        example = self.source.__getitems__(np.arange(1))
        n = self.experiment.training.batch_size
        batch = {k: jax.ShapeDtypeStruct((n, *v.shape[1:]), v.dtype) for k, v in example.items()}
        setup = self.setup
        run_loss = lambda p, b: setup.loss_fn(
            nnx.merge(setup.graphdef, p), b, jax.random.key(0), **setup.extras(p)
        )
        try:
            jax.eval_shape(run_loss, setup.abstract_params, batch)
        except UserError:
            raise  # already says what is wrong (e.g. a batch too small for a loss)
        except (ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"network {self.experiment.network.name!r} cannot train on data "
                f"{self.experiment.data.name!r} of example shape "
                f"{tuple(self.spec['example_shape'])}: {first}"
            ) from e

    def init_or_restore(self, ckpt: Checkpoints, workdir: str) -> tuple[TrainState, dict | None]:
        """(state, the config that trained it) from the newest intact checkpoint (damaged
        newer steps are moved aside, see `Checkpoints.restore_intact`), or (fresh, None)."""
        if not ckpt.all_steps():
            return self.setup.fresh_state(), None
        target = self.setup.abstract_state

        def restore(step: int) -> tuple[TrainState, dict]:
            old = _trained_config(ckpt, step, workdir)
            wrong = ckpt.mismatches(step, target.params)
            if wrong:  # checked before restoring: a failed orbax restore is noisy
                more = f" and {len(wrong) - 2} more" if len(wrong) > 2 else ""
                raise UserError(
                    f"cannot resume {workdir} from its step-{step} checkpoint: it does not "
                    f"fit this config ({_describe(config_changes(old, self.config_tree))}; "
                    f"weights: {'; '.join(wrong[:2])}{more}); resume with the run's own config "
                    "or train in a new workdir"
                )
            return ckpt.restore(step, target), old

        _, (state, old) = ckpt.restore_intact(
            restore, items=items_of(target), move_damaged=self.main
        )
        return state, old

    @property
    def config_tree(self) -> dict:
        return json.loads(self.config_text)

    @property
    def config_text(self) -> str:
        """The run's config.json: the experiment's config with the frozen runs resolved."""
        return _record_frozen(self.experiment.config_json, self.setup.frozen.frozen)

    def batches(self, start_step: int):
        t = self.experiment.training
        b = Batches(
            self.source,
            global_batch_size=t.batch_size,
            seed=t.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            random_flip=self.experiment.data.random_flip,
        )
        return prefetch(b.iterate(start_step), 2, lambda x: sharding.place_batch(x, self.mesh))


def _record_frozen(config_json: str, frozen) -> str:
    """`config_json` with each frozen network's run (absolute path) and step filled in."""
    if not frozen:
        return config_json
    tree = json.loads(config_json)
    for f in frozen:
        tree.setdefault("frozen", {})[f.name] = {"workdir": f.workdir, "step": f.step, "ema": f.ema}
    return json.dumps(tree, indent=2, sort_keys=True)


def _recorded_frozen(experiment: Experiment, workdir: str) -> Experiment:
    """On resume, the frozen networks' steps the run recorded where the config leaves them
    unset (a resumed run trains against the same frozen weights)."""
    path = os.path.join(workdir, "config.json")
    if not experiment.frozen or not os.path.exists(path):
        return experiment
    with open(path) as f:
        recorded = json.load(f).get("frozen", {})
    frozen = tuple(
        f if f.step is not None or f.name not in recorded
        else dataclasses.replace(f, step=recorded[f.name].get("step"))
        for f in experiment.frozen
    )  # fmt: skip
    return experiment.but(frozen=frozen)


# What a run was trained on: a resume that changes a key under these is refused unless
# asked for (`allow_changes`); other keys (steps, logging, sampling, ...) may change.
TRAINED_ON = ("data", "model", "loss", "frozen")


def _trained_config(ckpt: Checkpoints, step: int, workdir: str) -> dict | None:
    """The config that trained `step`: the one saved with it, else (a step of older code)
    the run's config.json; None when there is neither."""
    saved = ckpt.saved_config(step)
    if saved is not None:
        return saved
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def config_changes(old: dict | None, new: dict) -> list[tuple[str, object, object]] | None:
    """`[(key, old value, new value), ...]` of the flattened configs (None: no old one)."""
    if old is None:
        return None
    old, new = _canonical(_flat(old)), _canonical(_flat(new))
    unset = "(unset)"
    return [
        (k, old.get(k, unset), new.get(k, unset))
        for k in sorted(set(old) | set(new))
        if old.get(k, unset) != new.get(k, unset)
    ]


def _describe(changes, limit: int = 6) -> str:
    """`"changed: model.hidden 32 -> 64, ..."` of `config_changes`."""
    if changes is None:
        return "the run has no config.json to compare with"
    if not changes:
        return "same config.json: the checkpoint itself differs"
    listed = [f"{k} {a} -> {b}" for k, a, b in changes]
    more = f", and {len(listed) - limit} more" if len(listed) > limit else ""
    return "changed: " + ", ".join(listed[:limit]) + more


def _check_changes(changes, workdir: str, step: int, allow: bool, main: bool) -> None:
    """Refuse a resume that changes what the run was trained on (unless `allow`); list the
    other changes on stderr."""
    if not changes:
        return
    trained_on = [c for c in changes if c[0].split(".")[0] in TRAINED_ON]
    if trained_on and not allow:
        raise UserError(
            f"resuming {workdir} at step {step} would change what it was trained on "
            f"({_describe(trained_on, limit=4).removeprefix('changed: ')}); train in a new "
            "workdir, or pass --allow-changes to resume with the change (recorded in config.json)"
        )
    if main:
        print(
            f"resuming {workdir} at step {step} with config changes: "
            f"{_describe(changes, limit=10).removeprefix('changed: ')}",
            file=sys.stderr,
        )


def _canonical(flat: dict) -> dict:
    """One spelling of the guidance weight: `sample.cfg_scale` (the older name, still what
    presets set) moved to an unset `sample.guidance.scale`, so that a config that spells
    the same weight the other way is not listed as a change."""
    flat = dict(flat)
    scale = flat.get("sample.guidance.scale")
    if "sample.cfg_scale" in flat and scale in (None, flat["sample.cfg_scale"]):
        flat["sample.guidance.scale"] = flat.pop("sample.cfg_scale")
    return flat


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _prepare_workdir(text: str, workdir: str, main: bool) -> None:
    os.makedirs(workdir, exist_ok=True)
    if not main:
        return
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:  # keep the earlier config of a resumed run, never overwrite it
            os.replace(path, os.path.join(workdir, f"config.{int(time.time())}.json"))
    with open(path, "w") as f:
        f.write(text)


def train(
    experiment: Experiment,
    workdir: str,
    *,
    hooks: Sequence[Hook] = (),
    devices=None,
    allow_changes: bool = False,
) -> TrainState:
    """Train (or resume) `experiment` in `workdir`; returns the final state.

    `hooks` are called as `hook(step, state)` after every step; `devices` (default: all)
    are the devices the mesh is built from. With `training.eval_every`, the evaluation hook
    of `core.evaluation` runs too. Everything that can be wrong with the input (data,
    classes, frozen runs, a checkpoint that does not fit, a resume that changes what the
    run was trained on unless `allow_changes`) fails before the workdir is written. One
    training holds a workdir at a time (`core.workdir.WorkdirLock`); SIGTERM or SIGINT
    stop it with a checkpoint of the step it is at (`TrainingInterrupted`).
    """
    experiment = _recorded_frozen(experiment, workdir)
    run = _Run(experiment, workdir, devices)
    if run.main:
        make_writable(workdir)
    with WorkdirLock(workdir, enabled=run.main):
        return _train_locked(run, workdir, hooks, allow_changes)


def _train_locked(run: _Run, workdir: str, hooks: Sequence[Hook], allow_changes: bool):
    experiment, t = run.experiment, run.experiment.training
    ckpt = Checkpoints(workdir, max_to_keep=t.keep_ckpts)
    try:
        # restore first: a resume that does not fit this config changes nothing on disk
        state, trained = run.init_or_restore(ckpt, workdir)
        start = int(jax.device_get(state.step))
        if trained is not None:
            changes = config_changes(trained, run.config_tree)
            _check_changes(changes, workdir, start, allow_changes, run.main)
    except BaseException:
        ckpt.close()
        raise
    if start >= t.total_steps:
        ckpt.close()
        if run.main:
            print(
                f"{workdir} is already at step {start} (total_steps={t.total_steps}): nothing "
                "to train; raise --config.total_steps to go on",
                file=sys.stderr,
            )
        return state
    _prepare_workdir(run.config_text, workdir, run.main)
    if run.main:
        write_data_spec(workdir, run.spec)
    writer = MetricWriter(workdir, enabled=run.main, start_step=start)
    try:
        if t.eval_every:
            from core.evaluation import make_eval_hook  # imports the metrics: when asked

            hook = make_eval_hook(
                experiment,
                workdir,
                writer=writer,
                mesh=run.mesh,
                source=run.source,
                graphdef=run.graphdef,
                spec=run.spec,
                frozen=run.setup.frozen,
            )
            hooks = (*hooks, hook)
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
    t = run.experiment.training
    step_fn = run.setup.jit_step()
    # a family that generates nothing (a classifier) draws no sample grids
    grid = _SampleGrid(run) if t.sample_every and run.experiment.method.generates else None
    metrics_log = _MetricsLog(t, writer, ckpt, start)
    bar = tqdm(
        total=t.total_steps,
        initial=start,
        disable=not run.main,
        dynamic_ncols=True,
        mininterval=1.0,
        desc="train",
    )
    eval_every = t.eval_every
    config = run.config_tree  # saved with each checkpoint
    step, stop = start, None
    with run.batches(start) as batches, bar, _Stop(t.train_seconds, t.log_every) as stopper:
        for step in range(start + 1, t.total_steps + 1):
            state, metrics = step_fn(state, next(batches))
            metrics_log.add(metrics)
            bar.update(1)
            stop = stopper.check(step)
            last = step == t.total_steps or stop is not None
            if _every(step, t.ckpt_every, last):
                metrics_log.check_finite(step)  # before saving: never save past a NaN
                ckpt.save(state, config)
            # evaluation steps log too: their numbers join the line with the step's loss
            if _every(step, t.log_every, last) or _every(step, eval_every, False):
                bar.set_postfix(loss=f"{metrics_log.write(step):.4g}")
            if stop in _Stop.SIGNALS:
                break  # preempted: the checkpoint is what matters; no grid, no hooks
            if grid is not None and _every(step, t.sample_every, last):
                grid.write(state, step, writer, final=last)
            for hook in hooks:
                hook(step, state)
            if last:
                break
    if stop in _Stop.SIGNALS:
        ckpt.wait()
        raise TrainingInterrupted(
            f"{stop} at step {step} of {t.total_steps}: checkpoint saved in {ckpt.directory}; "
            "run the same command to resume",
            status=128 + int(_Stop.SIGNALS[stop]),
        )
    if stop == "budget" and run.main:
        print(
            f"train_seconds={t.train_seconds:g} spent: stopped at step {step} of "
            f"{t.total_steps} (checkpoint saved; run again to go on)"
        )
    return state


class _Stop:
    """Why the loop stops before `total_steps`: the wall-clock budget `train_seconds`
    (0 = none, counted from the start of the loop, the first compilation included), or
    SIGTERM / SIGINT (a preemption or Ctrl-C; a second signal stops at once).

    Every process must stop at the same step. With one process the checks run every step.
    With several, SIGTERM is JAX's preemption notice (`jax.distributed` catches it and
    `reached_preemption_sync_point`, asked every step, agrees on the step to stop at), and
    process 0's clock and Ctrl-C decide the rest, read at `log_every` steps (one broadcast).
    """

    SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "preemption": signal.SIGTERM}

    def __init__(self, seconds: float, log_every: int):
        self.seconds = float(seconds or 0.0)
        self.multi = jax.process_count() > 1
        self.every = max(int(log_every), 1) if self.multi else 1
        self.t0 = time.monotonic()
        self.received: str | None = None
        self._old = {}

    def __enter__(self) -> "_Stop":
        import threading

        if threading.current_thread() is threading.main_thread():
            # SIGTERM of a multi-host run is left to jax.distributed's preemption notice
            for sig in (signal.SIGINT,) if self.multi else (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # the other signal after one: stop now
            self.__exit__()
            os.kill(os.getpid(), signum)
            return
        self.received = name
        # from now on the signal is the operating system's: a second one stops the process
        # at once, even inside a long XLA call or the checkpoint's save (where no Python
        # handler could run until the call returns)
        signal.signal(signum, signal.SIG_DFL)
        if jax.process_index() == 0:
            print(
                f"\n{name} received: stopping with a checkpoint after this step (send it again "
                "to stop at once, without one)",
                file=sys.stderr,
                flush=True,
            )

    def check(self, step: int) -> str | None:
        """ "budget", "SIGTERM", "SIGINT", "preemption", or None to go on."""
        if self.multi:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                return "preemption"
        if step % self.every:
            return None
        code = 0
        if self.received is not None:
            code = 2 if self.received == "SIGINT" else 3
        elif self.seconds > 0 and time.monotonic() - self.t0 >= self.seconds:
            code = 1
        if self.multi:
            from jax.experimental import multihost_utils

            code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
        return (None, "budget", "SIGINT", "SIGTERM")[code]


class _MetricsLog:
    """Sums step metrics on device; averages, checks and writes them every `log_every`."""

    def __init__(self, training: Training, writer: MetricWriter, ckpt: Checkpoints, start: int):
        self.training, self.writer, self.ckpt = training, writer, ckpt
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
            lr=learning_rate(self.training.optim, self.training.total_steps, step - 1),
            steps_per_sec=n / elapsed,
            examples_per_sec=n * self.training.batch_size / elapsed,
        )
        self.writer.write(step, means)
        self.sums, self.first, self.t0 = None, step, time.perf_counter()
        return means["loss"]


class _SampleGrid:
    """Periodic PNG of samples from the EMA weights, with fixed noise (and conditions):
    `core.sampling.Generator`, compiled once for the run."""

    def __init__(self, run: _Run):
        self.run = run
        experiment = run.experiment
        shape = tuple(run.spec["example_shape"])
        kind = experiment.sampling.plot
        self.kind = ("grid" if len(shape) == 3 else "scatter") if kind == "auto" else kind
        num = experiment.sampling.num
        n_ref = min(num * 8, run.source.num_examples)
        reference = run.source.__getitems__(np.arange(n_ref))
        self.reference = None if self.kind == "grid" else reference["x"]
        conds = None
        if experiment.conditioning.cond_dim:  # condition embeddings: those of the first examples
            conds = reference["cond"][np.arange(num) % n_ref]
        batch = sharding.sample_batch(run.mesh, num, num)  # one call
        self.generate = sampling.Generator(
            experiment, run.graphdef, run.spec, run.mesh, num=num, batch_size=batch,
            conds=conds, frozen=run.setup.frozen,
        )  # fmt: skip
        self.key = jax.random.fold_in(jax.random.key(experiment.training.seed), 2**30)

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

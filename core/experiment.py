"""The experiment: a ConfigDict turned, once, into a typed object.

`Experiment.from_config(config)` is the one reader of ConfigDicts (with `core/config.py`,
which loads them, and `scripts/`, which parse flags into them). Everything below it (the
trainer, generation, evaluation, the benchmark) takes the `Experiment` or one of its parts:

- `network` (`Network`): the registry name, constructor options and compute dtype, and the
  conditioning (`Conditioning`: labels, embeddings or none), answered here only;
- `loss` (`Loss`): name and options, bound once (`fn`);
- `method` (`core.methods.Method`): the family, found from the loss;
- `frozen` (`Frozen`, by name): networks of other runs, restored read-only
  (`core.runs.restore_frozen`);
- `data` (`Data`): the data source of a split;
- `sampling` (`Sampling`): prior, sampler, steps, guidance (weight, schedule, interval)
  and sampler options;
- `training`, `mesh`, `evaluation`: the trainer's settings.
"""

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

import data as data_lib
import losses
import models
from core.config import to_json
from core.errors import UserError, lookup
from core.methods import Method, method_for_loss
from samplers.guidance import DEFAULT_DROP, Guidance

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _plain(value):
    """ConfigDict / lists -> plain python containers (tuples) for keyword arguments."""
    if isinstance(value, ConfigDict | dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What a network is conditioned on: `num_classes` labels (the label `num_classes` is
    the null label of classifier-free guidance), `cond_dim`-wide embeddings (null: zeros),
    or nothing."""

    num_classes: int = 0
    cond_dim: int = 0

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0 or self.cond_dim > 0

    @property
    def labels(self) -> bool:
        return self.num_classes > 0

    @property
    def null(self) -> int:
        """The null condition's label (the embeddings' null is the zero vector)."""
        return self.num_classes

    def check_data(self, data_name: str, spec: dict) -> None:
        """A label network needs labelled data with at most its `num_classes` classes (a
        larger label would index past its label table: NaN, not an error)."""
        if not self.labels:
            return
        data = int(spec.get("num_classes", 0))
        if data == 0:
            raise UserError(
                f"model.num_classes={self.num_classes} but data {data_name!r} gives no labels "
                "(set data.use_labels=True, or model.num_classes=0 for an unconditional model)"
            )
        if data > self.num_classes:
            raise UserError(
                f"data {data_name!r} has {data} classes but model.num_classes="
                f"{self.num_classes}: set model.num_classes={data}"
            )


@dataclasses.dataclass(frozen=True)
class Network:
    """A network of `models.NETWORKS`: `build(rngs)`, `abstract(seed)`, `init(seed)`."""

    name: str
    options: dict
    dtype: Any = jnp.float32

    @property
    def conditioning(self) -> Conditioning:
        return Conditioning(
            int(self.options.get("num_classes", 0) or 0), int(self.options.get("cond_dim", 0) or 0)
        )

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        return models.build(self.name, rngs=rngs, dtype=self.dtype, **self.options)

    def abstract(self, seed: int = 0):
        """(graphdef, abstract params as a pure dict) without allocating anything."""
        return abstract_network(self.build, seed)

    def init(self, seed: int):
        """Concrete params as a pure dict (call under jit with out_shardings to shard)."""
        return init_params(self.build, seed)

    def with_dtype(self, dtype: str) -> "Network":
        return dataclasses.replace(self, dtype=_dtype(dtype))


def abstract_network(factory, seed: int = 0):
    """(graphdef, abstract params as a pure dict) of `factory(rngs)`, nothing allocated."""
    abstract = nnx.eval_shape(lambda: factory(nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise TypeError(
            f"network {type(abstract).__name__} holds non-Param state; "
            "networks must hold nnx.Param only"
        )
    return graphdef, nnx.to_pure_dict(params)


def init_params(factory, seed: int):
    return nnx.to_pure_dict(nnx.split(factory(nnx.Rngs(seed)), nnx.Param)[1])


@dataclasses.dataclass(frozen=True)
class Loss:
    name: str
    options: dict

    @functools.cached_property
    def fn(self):
        """The loss with its options bound (`losses.build`)."""
        return losses.build(self.name, **self.options)

    @property
    def frozen_nets(self) -> tuple[str, ...]:
        """The trainer-supplied networks its signature takes (`losses.FROZEN_NETS`)."""
        return losses.frozen_nets(self.fn)


@dataclasses.dataclass(frozen=True)
class Data:
    """The data section: `source(split)` builds a `data` source of any split."""

    name: str
    split: str = "train"
    use_labels: bool = False
    random_flip: bool = False
    path: str | None = None
    image_size: int | None = None
    data_dir: str | None = None
    options: dict = dataclasses.field(default_factory=dict)

    def source(self, split: str | None = None):
        options = dict(self.options)
        if self.data_dir is not None:
            options["data_dir"] = self.data_dir
        if self.path is not None:
            options["path"] = self.path
        if self.image_size is not None:
            options["image_size"] = self.image_size
        if self.use_labels:
            options["use_labels"] = True
        split = split or self.split
        if self.name == "npz" and split != self.split and "{split}" not in (self.path or ""):
            raise UserError(
                f"split {split!r} asked of npz data {self.path!r}, which is the {self.split!r} "
                "split only; name one file per split with {split} in data.path "
                "(data/x_{split}.npz)"
            )
        return data_lib.build_source(self.name, split=split, **options)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How samples are drawn: `prior` noise -> `sampler` in `num_steps` steps, classifier-free
    `guidance` (`samplers.guidance.Guidance`: weight, schedule, interval; weight 1 = none),
    sampler keyword `options`. `sampler` and `prior` are None for a family that generates
    nothing (`Method.generates`: a classifier)."""

    sampler: str | None
    num_steps: int
    guidance: Guidance
    prior: str | None
    options: dict
    num: int = 64
    plot: str = "auto"

    @property
    def cfg_scale(self) -> float:
        """The guidance weight (`guidance.scale`; `--cfg`, `sample.cfg_scale`)."""
        return self.guidance.scale

    def but(self, *, sampler=None, num_steps=None, cfg_scale=None, cfg_schedule=None,
            cfg_interval=None, options=None) -> "Sampling":  # fmt: skip
        """This sampling with the given fields replaced (None: kept); `options` are merged
        over the current ones; `cfg_*` replace the guidance's scale, schedule, interval."""
        steps = int(self.num_steps if num_steps is None else num_steps)
        if steps < 1:
            raise UserError(f"the number of sampling steps must be >= 1, got {steps}")
        g = self.guidance
        if cfg_schedule is not None and cfg_interval is None and cfg_schedule != g.schedule:
            cfg_interval = (0.0, 1.0)  # a new schedule does not inherit the old one's interval
        guidance = Guidance(
            scale=g.scale if cfg_scale is None else float(cfg_scale),
            schedule=cfg_schedule or g.schedule,
            interval=g.interval if cfg_interval is None else cfg_interval,
            drop=g.drop,
        )
        return dataclasses.replace(
            self,
            sampler=sampler or self.sampler,
            num_steps=steps,
            guidance=guidance,
            options={**self.options, **(options or {})},
        )

    def record(self) -> dict:
        """What an evaluation writes beside its numbers."""
        g = self.guidance
        return {
            "sampler": self.sampler,
            "sampling_steps": self.num_steps,
            "cfg": g.scale,
            "cfg_schedule": g.schedule,
            "cfg_interval": list(g.interval),
            "sample_options": dict(self.options),
        }


@dataclasses.dataclass(frozen=True)
class Frozen:
    """A network of another run, used read-only: the weights of `workdir` at `step` (None:
    the newest), EMA or raw; handed to the loss and to generation as `<name>_net`."""

    name: str
    workdir: str
    step: int | None = None
    ema: bool = True


@dataclasses.dataclass(frozen=True)
class Training:
    seed: int
    total_steps: int
    batch_size: int
    optim: dict
    ema_decay: float
    ema_warmup: bool = False
    teacher_ema_decay: float = 0.0
    train_seconds: float = 0.0
    log_every: int = 100
    ckpt_every: int = 1000
    keep_ckpts: int = 3
    sample_every: int = 0
    eval_every: int = 0


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    data: int = -1
    fsdp: int = 1
    fsdp_min_size: int = 2**18

    def make(self, devices=None):
        from core import sharding

        return sharding.make_mesh(self.data, self.fsdp, devices)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The in-training evaluation (`core.evaluation.make_eval_hook`)."""

    num_samples: int = 1000
    max_train: int = 10_000
    fid: bool = False
    num_fid: int = 5000
    batch_size: int = 256
    ref_split: str | None = None


@dataclasses.dataclass(frozen=True)
class Experiment:
    network: Network
    loss: Loss
    method: Method
    data: Data
    sampling: Sampling
    training: Training
    mesh: MeshSpec
    evaluation: Evaluation
    frozen: tuple[Frozen, ...] = ()
    config_json: str = "{}"  # the config as written to a run's config.json

    @classmethod
    def from_config(cls, config: ConfigDict) -> "Experiment":
        """Read and check every section of `config` (unknown names are UserErrors here)."""
        c = config
        loss = Loss(c.loss.name, _plain({k: v for k, v in c.loss.items() if k != "name"}))
        loss.fn  # an unknown loss or option fails here, listing the known ones  # noqa: B018
        method = method_for_loss(loss.name)
        model = _plain(c.model)
        network = Network(model.pop("name"), model, _dtype(c.compute_dtype))
        lookup(models.NETWORKS, network.name, "network")
        sampling, data, training = _sampling(c.sample, method), _data(c.data), _training(c)
        mesh = _section(MeshSpec, "mesh", c.get("mesh", ConfigDict()))
        evaluation = _section(Evaluation, "eval", c.get("eval", ConfigDict()))
        frozen = tuple(
            _frozen(name, section) for name, section in _plain(c.get("frozen", {})).items()
        )
        exp = cls(network, loss, method, data, sampling, training, mesh, evaluation, frozen,
                  to_json(config))  # fmt: skip
        exp._check()
        return exp

    def _check(self) -> None:
        if self.method.samplers or self.sampling.sampler is not None:
            self.method.check_sampler(self.sampling.sampler)  # a classifier takes none
        if self.training.eval_every and not self.method.generates:
            raise UserError(
                f"eval_every={self.training.eval_every} evaluates samples, but a "
                f"{self.method.name} model does not generate samples: set eval_every=0"
            )
        decay = self.training.teacher_ema_decay
        if not 0.0 <= decay < 1.0:
            raise UserError(f"teacher_ema_decay={decay} must be in [0, 1) (0 = no teacher EMA)")
        if decay > 0 and "teacher_ema_net" not in self.loss.frozen_nets:
            raise UserError(
                f"teacher_ema_decay={decay} keeps a teacher EMA, but loss {self.loss.name!r} "
                "takes none (the shortcut loss with loss.teacher='teacher_ema' does); "
                "set teacher_ema_decay=0"
            )

    @property
    def keeps_teacher_ema(self) -> bool:
        return self.training.teacher_ema_decay > 0

    @property
    def conditioning(self) -> Conditioning:
        return self.network.conditioning

    def but(self, **changes) -> "Experiment":
        """A copy with fields replaced (`dataclasses.replace`), e.g. `sampling=`."""
        return dataclasses.replace(self, **changes)

    def with_sampling(self, **changes) -> "Experiment":
        """A copy whose sampling has `Sampling.but(**changes)` (None values: kept)."""
        return self.but(sampling=self.sampling.but(**changes))


def _sampling(s: ConfigDict, method: Method) -> Sampling:
    """The `sample` section; an unset sampler or prior is the family's default (None for a
    family without samplers)."""
    return Sampling(
        sampler=s.get("sampler") or method.sampler,
        num_steps=int(s.num_steps),
        guidance=_guidance(s),
        prior=s.get("prior") or method.prior,
        options=_plain(s.get("options", ConfigDict())),
        num=int(s.get("num", 64)),
        plot=s.get("plot", "auto"),
    )


GUIDANCE_KEYS = ("schedule", "scale", "interval", "drop")


def _guidance(s: ConfigDict) -> Guidance:
    """`sample.guidance` {schedule, scale, interval, drop}; `sample.cfg_scale` is the older
    name of `sample.guidance.scale` (run directories written before the section existed
    have only it): either may be set, both only to the same value."""
    section = _plain(s.get("guidance") or {})
    unknown = sorted(set(section) - set(GUIDANCE_KEYS))
    if unknown:
        raise UserError(
            f"config section 'sample.guidance' has no key(s) {', '.join(unknown)}; its keys: "
            f"{', '.join(GUIDANCE_KEYS)}"
        )
    old, new = s.get("cfg_scale"), section.get("scale")
    if old is not None and new is not None and float(old) != float(new):
        raise UserError(
            f"sample.cfg_scale={old} and sample.guidance.scale={new} disagree: they are one "
            "setting (cfg_scale is its older name); set one of them"
        )
    scale = new if new is not None else old if old is not None else 1.0
    return Guidance(
        scale=float(scale),
        schedule=section.get("schedule") or "constant",
        interval=section.get("interval") if section.get("interval") is not None else (0.0, 1.0),
        drop=float(section["drop"]) if section.get("drop") is not None else DEFAULT_DROP,
    )


def _data(d: ConfigDict) -> Data:
    return Data(
        name=d.name,
        split=d.split,
        use_labels=bool(d.get("use_labels", False)),
        random_flip=bool(d.get("random_flip", False)),
        path=d.get("path"),
        image_size=d.get("image_size"),
        data_dir=d.get("data_dir"),
        options=_plain(d.get("options", ConfigDict())),
    )


def _training(c: ConfigDict) -> Training:
    return Training(
        seed=int(c.seed),
        total_steps=int(c.total_steps),
        batch_size=int(c.batch_size),
        optim=_plain(c.optim),
        ema_decay=float(c.ema_decay),
        ema_warmup=bool(c.get("ema_warmup", False)),
        teacher_ema_decay=float(c.get("teacher_ema_decay", 0.0)),
        train_seconds=float(c.get("train_seconds", 0.0) or 0.0),
        log_every=int(c.log_every),
        ckpt_every=int(c.ckpt_every),
        keep_ckpts=int(c.keep_ckpts),
        sample_every=int(c.get("sample_every", 0) or 0),
        eval_every=int(c.get("eval_every", 0) or 0),
    )


def _section(cls, name: str, section: ConfigDict):
    """`cls(**section)`; a key `cls` does not have is a UserError naming the section."""
    values = _plain(section)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UserError(
            f"config section {name!r} has no key(s) {', '.join(unknown)}; its keys: "
            f"{', '.join(sorted(fields))}"
        )
    return cls(**values)


def _frozen(name: str, section: dict) -> Frozen:
    unknown = sorted(set(section) - {"workdir", "step", "ema"})
    if unknown:
        raise UserError(
            f"frozen.{name} has no key(s) {', '.join(unknown)}; its keys: workdir, step, ema"
        )
    if not section.get("workdir"):
        raise UserError(f"frozen.{name}.workdir is not set: name the run whose network to use")
    step = section.get("step")
    return Frozen(name, section["workdir"], None if step is None else int(step),
                  bool(section.get("ema", True)))  # fmt: skip


def _dtype(name: str):
    if name not in DTYPES:
        raise UserError(f"unknown compute_dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def data_spec(source) -> dict:
    """What `data_spec.json` records: the example shape and the number of classes."""
    return {"example_shape": list(source.example_shape), "num_classes": int(source.num_classes)}


def write_data_spec(workdir: str, spec: dict) -> None:
    with open(os.path.join(workdir, "data_spec.json"), "w") as f:
        json.dump(spec, f)


def read_data_spec(workdir: str) -> dict:
    path = os.path.join(workdir, "data_spec.json")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: is {workdir} a driftlab run directory?")
    with open(path) as f:
        return json.load(f)


def sample_labels(n: int, num_classes: int | None, offset: int = 0) -> jax.Array:
    """Labels 0..num_classes-1 cycled (or zeros, ignored, for unconditional models)."""
    if not num_classes:
        return jnp.zeros((n,), jnp.int32)
    return (jnp.arange(n, dtype=jnp.int32) + offset) % num_classes

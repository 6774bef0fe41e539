"""Experiment configs: the shared defaults, variant parsing and loading by path.

An experiment is a python file under `experiments/` whose `get_config(arg=None)` returns an
`ml_collections.ConfigDict`; `arg` is the text after a colon on the command line
(`mnist_unet.py:net=dit,smoke=True`) and is parsed by `parse_variant`.
"""

import importlib.util
import os

import ml_collections
from ml_collections import ConfigDict

from core.errors import UserError

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def base_config() -> ConfigDict:
    """Every key the trainer reads, with its default. Experiments override what they need."""
    c = ConfigDict()
    c.seed = 0
    c.total_steps = 10_000
    # wall-clock budget of the training loop in seconds (0 = none): the run stops at the first
    # step past it as if that were the last (checkpoint, log, samples); the learning-rate
    # schedule still follows total_steps, and a later run resumes from there
    c.train_seconds = 0.0
    c.batch_size = 128
    c.log_every = 100
    c.ckpt_every = 1_000
    c.keep_ckpts = 3
    c.sample_every = 1_000  # PNG grid of samples; 0 = never
    c.eval_every = 0  # cheap memorization (and optional FID) during training; 0 = never
    c.compute_dtype = "float32"  # or "bfloat16" (params and optimizer stay float32)
    c.ema_decay = 0.9999
    c.ema_warmup = False  # decay min(ema_decay, (1 + n) / (10 + n)) at update n
    # a second EMA with its own decay, as the bootstrap teacher of the shortcut loss
    # (loss.teacher="teacher_ema"; the "twin EMA" of iSM, arXiv 2510.21250); 0 = none
    c.teacher_ema_decay = 0.0
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "fsdp_min_size": 2**18})
    c.optim = ConfigDict(
        {
            "lr": 1e-4,
            "warmup_steps": 1_000,
            "schedule": "constant",
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
        }
    )
    c.data = ConfigDict(
        {
            "name": "mnist",
            "split": "train",
            "use_labels": False,
            "random_flip": False,
            # tfds data directory; None = $TFDS_DATA_DIR or tfds's default (~/tensorflow_datasets)
            "data_dir": ml_collections.config_dict.placeholder(str),
            "path": ml_collections.config_dict.placeholder(str),  # for name="npz"
            "image_size": ml_collections.config_dict.placeholder(int),  # center crop + resize
            "options": ConfigDict(),  # more keyword options of the data source (set in configs)
        }
    )
    # networks of other runs, used frozen: frozen.<name> = {workdir, step (None: newest),
    # ema}; the loss and generation get each as `<name>_net` (core.experiment.Frozen)
    c.frozen = ConfigDict()
    c.model = ConfigDict({"name": "unet"})
    c.loss = ConfigDict({"name": "flow_matching"})
    guidance_scale = ml_collections.config_dict.placeholder(float)  # None: 1, no guidance
    c.sample = ConfigDict(
        {
            # None: the family's default (core.methods.METHODS)
            "sampler": ml_collections.config_dict.placeholder(str),
            "num_steps": 50,
            # the guidance weight under its older name: one field with sample.guidance.scale
            # (one FieldReference: setting either sets both; None: 1 = no guidance)
            "cfg_scale": guidance_scale,
            # classifier-free guidance (samplers.guidance.Guidance): weight `scale`,
            # `schedule` constant / interval / linear / dynamic,
            # `interval` (t_lo, t_hi) of interval and dynamic, `drop` the dynamic switch's
            # relative drop of the gap below its running maximum (None: the default)
            "guidance": ConfigDict(
                {
                    "schedule": "constant",
                    "scale": guidance_scale,
                    "interval": (0.0, 1.0),
                    "drop": ml_collections.config_dict.placeholder(float),  # None: 0.05
                }
            ),
            "num": 64,
            "prior": ml_collections.config_dict.placeholder(str),
            "plot": "auto",
            "options": ConfigDict(),  # extra keyword arguments of the sampler
        }
    )
    # core.evaluation.make_eval_hook: EMA samples every `eval_every` steps against at most
    # `max_train` training examples (pixel space); with `fid`, FID of `num_fid` samples
    # against `ref_split` (default: the training split), its statistics cached on disk.
    c.eval = ConfigDict(
        {
            "num_samples": 1_000,
            "max_train": 10_000,
            "fid": False,
            "num_fid": 5_000,
            "batch_size": 256,
            "ref_split": ml_collections.config_dict.placeholder(str),
        }
    )
    return c


def parse_variant(arg: str | None, **defaults) -> ConfigDict:
    """Parse `"net=dit,size=B/2,smoke=True"` against `defaults` (which fix keys and types)."""
    out = ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"config variant {item!r} is not of the form key=value")
        if key not in defaults:
            raise UserError(
                f"unknown config variant key {key!r}; known: {', '.join(sorted(defaults))}"
            )
        out[key] = _coerce(key, value.strip(), defaults[key])
    return out


def _coerce(key: str, value: str, default):
    if isinstance(default, bool):
        if value.lower() not in _TRUE + _FALSE:
            raise UserError(f"config variant {key}={value!r} is not a boolean")
        return value.lower() in _TRUE
    if isinstance(default, int | float) and default is not None:
        try:
            return type(default)(value)
        except ValueError:
            raise UserError(
                f"config variant {key}={value!r} is not a {type(default).__name__}"
            ) from None
    return value


def load(spec: str) -> ConfigDict:
    """Load `path/to/config.py[:variant]` as the command line would."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location("_driftlab_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} has no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name v` or `--name=v` in `argv` (e.g. name `config.loss.name`)."""
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _option_type(param, text: str | None):
    """The type of a keyword option: its default's, else the first of its annotation's
    (`float | None` -> float), else the overriding text's literal."""
    import ast
    import typing

    if param.default is not None and param.default is not param.empty:
        return type(param.default)
    for t in typing.get_args(param.annotation) or (param.annotation,):
        if t in (bool, int, float, str):
            return t
    try:
        return type(ast.literal_eval(text or ""))
    except (ValueError, SyntaxError):
        return str


def add_option_overrides(config: ConfigDict, argv: list[str], flag: str = "config") -> None:
    """Make `--config.loss.X=v` and `--config.model.X=v` work for every keyword option of the
    configured loss / network, not only those the config file lists: an option named on the
    command line but absent from the config (or None there, which ml_collections cannot
    override) is added with its default and a type, so the override applies and is checked
    as any other. Unknown options stay unknown (`check_override_keys`)."""
    from ml_collections import FieldReference

    import losses

    _add_frozen_overrides(config, argv, flag)
    for section in ("loss", "model"):
        if section not in config or "name" not in config[section]:
            continue
        name = flag_value(argv, f"{flag}.{section}.name") or config[section].name
        if section == "loss":
            fn = losses.LOSSES.get(name)
        else:
            import models

            fn = getattr(models.NETWORKS.get(name), "__init__", None)
        if fn is None:
            continue  # an unknown name: its own error later
        for key, param in _option_params(fn).items():
            text = flag_value(argv, f"{flag}.{section}.{key}")
            if text is None:
                continue
            if key in config[section] and config[section][key] is not None:
                continue
            default = None if param.default is param.empty else param.default
            kind = _option_type(param, text)
            if kind not in (bool, int, float, str):
                continue  # not a command-line value (dtypes come from compute_dtype)
            with config.unlocked():
                if key in config[section]:
                    del config[section][key]  # a None field: replaced, not assigned to
                config[section][key] = FieldReference(default, field_type=kind)


def _option_params(fn) -> dict:
    """The keyword options of a loss function or a network's `__init__`: its parameters but
    the network, batch, key, rngs and frozen networks (`<name>_net`) the code supplies."""
    import inspect

    skip = {"self", "rngs", "net", "batch", "key"}
    params = inspect.signature(fn).parameters
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {
        k: p for k, p in params.items()
        if k not in skip and not k.endswith("_net") and p.kind not in variadic
    }  # fmt: skip


def section_options(
    config: ConfigDict, section: str, argv: list[str] = (), flag: str = "config"
) -> tuple[str, dict] | None:
    """`(what, {option: inspect.Parameter})` of the loss or network that the config names
    (`--config.loss.name` on the command line first), e.g. `("loss 'flow_matching'", ...)`;
    None for another section or an unknown name."""
    import losses

    if section not in ("loss", "model") or "name" not in config.get(section, {}):
        return None
    name = flag_value(list(argv), f"{flag}.{section}.name") or config[section].name
    if section == "loss":
        fn, what = losses.LOSSES.get(name), f"loss {name!r}"
    else:
        import models

        fn, what = getattr(models.NETWORKS.get(name), "__init__", None), f"network {name!r}"
    return None if fn is None else (what, _option_params(fn))


def _add_frozen_overrides(config: ConfigDict, argv: list[str], flag: str) -> None:
    """A section `frozen.<name>` (workdir, step, ema) for every name that
    `--config.frozen.<name>.<key>=v` uses and the config does not have."""
    prefix = f"--{flag}.frozen."
    names = {a[len(prefix) :].split(".")[0].split("=")[0] for a in argv if a.startswith(prefix)}
    if not names:
        return
    with config.unlocked():
        if "frozen" not in config:
            config.frozen = ConfigDict()
        for name in sorted(names - set(config.frozen.keys())):
            config.frozen[name] = ConfigDict(
                {
                    "workdir": ml_collections.config_dict.placeholder(str),
                    "step": ml_collections.config_dict.placeholder(int),
                    "ema": True,
                }
            )


def check_override_keys(config: ConfigDict, argv: list[str], flag: str = "config") -> None:
    """Every `--config.a.b=v` must name an existing key; otherwise one clear UserError."""
    prefix = f"--{flag}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        path = arg[len(prefix) :].partition("=")[0]
        node = config
        for depth, part in enumerate(path.split(".")):
            if not isinstance(node, ConfigDict) or part not in node:
                options = section_options(config, path.split(".")[0], argv, flag)
                if depth == 1 and options is not None:  # a loss / network option: name them
                    what, known = options
                    raise UserError(
                        f"unknown config key {path!r}: {what} has no option {part!r}; its "
                        f"options: {', '.join(sorted(known)) or 'none'}"
                    )
                where = ".".join(path.split(".")[:depth]) or "the config"
                known = ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else ""
                raise UserError(
                    f"unknown config key {path!r}: {where} has no {part!r}"
                    + (f" (keys: {known})" if known else "")
                )
            node = node[part]


def to_json(config: ConfigDict) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
    import json

    return ml_collections.ConfigDict(json.loads(text))

"""What every CLI shares: one-line errors, config flags, multi-host start-up."""

import copy
import os
import sys
from collections.abc import Callable

from core.errors import TrainingInterrupted, UserError


def run(main: Callable[[list[str]], int | None]) -> None:
    """Run `main(argv)`; a UserError is printed as one line (`error: ...`), exit status 2;
    an interrupted training (`TrainingInterrupted`) as `interrupted: ...`, exit status
    128 + the signal (130 for SIGINT, 143 for SIGTERM).

    Set DRIFTLAB_DEBUG=1 to get the traceback instead.
    """
    try:
        code = main(sys.argv)
    except UserError as e:
        if os.environ.get("DRIFTLAB_DEBUG"):
            raise
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.status)
    sys.exit(code or 0)


def append_json_line(result: dict, path: str | None) -> None:
    """Print `result` as one JSON line and, when `path` is given, append that line there
    (a benchmark's results accumulate in one JSON-lines file)."""
    import json

    line = json.dumps(result)
    print(line)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def npz_path(path: str) -> str:
    """The file `np.savez(path)` writes: `path`, with `.npz` added where it lacks it."""
    return path if path.endswith(".npz") else path + ".npz"


def write_json(result: dict, path: str | None) -> None:
    """Print `result` as indented JSON and, when `path` is given, write it there too."""
    import json

    text = json.dumps(result, indent=2, sort_keys=True)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text)


def argument_parser(name: str, doc: str | None, *, passes_on: bool = False):
    """The argparse parser of `python -m scripts.<name>`, its help the module docstring.
    `passes_on`: the script hands the flags it does not know to another CLI
    (`parse_known_args`), so abbreviations are off: `--step` (the other's) would otherwise be
    taken as this one's `--steps`."""
    import argparse

    return argparse.ArgumentParser(
        prog=f"python -m scripts.{name}",
        description=doc,
        formatter_class=_help_formatter(),
        allow_abbrev=not passes_on,
    )


def _help_formatter():
    """`--help` keeps the docstring's layout and ends each flag's line with its default
    (`(default: 256)`; none for defaults of None, False or empty, which mean "not given")."""
    import argparse

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def add_argument(self, action):
            default = action.default
            shown = not (
                default is None or default is False or default == [] or default is argparse.SUPPRESS
                or not action.option_strings
            )  # fmt: skip
            if shown and "%(default)" not in (action.help or ""):
                action = copy.copy(action)  # the parser's own action keeps its help
                action.help = " ".join(filter(None, [action.help, "(default: %(default)s)"]))
            super().add_argument(action)

    return Formatter


def parse_config_flags(argv: list[str]):
    """Parse `--config path[:variant] [--config.key=value ...] --workdir DIR`.

    The config file is loaded and every override key checked first, so a missing file,
    a bad variant or an unknown key is one clear UserError; options of the loss and the
    network that the file does not list are added (`config.add_option_overrides`); then
    ml_collections' config_flags applies the overrides (types checked against the
    defaults).
    """
    from absl import flags
    from ml_collections import config_flags

    from core import config as config_lib

    spec = config_lib.flag_value(argv, "config")
    if spec is None:
        raise UserError("--config is required (e.g. --config experiments/quickstart.py)")
    config = config_lib.load(spec)
    config_lib.add_option_overrides(config, argv)  # any option of the loss / network
    config_lib.check_override_keys(config, argv)
    argv = _without_flag(argv, "config")  # the dict flag takes overrides, not the file
    # sys_argv: config_flags finds the override flags to register in this list
    config_flag = config_flags.DEFINE_config_dict("config", config, lock_config=True, sys_argv=argv)
    workdir = flags.DEFINE_string("workdir", None, "run directory (created; resumed if present)")
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        raise UserError(str(e).strip().splitlines()[0]) from e
    if not workdir.value:
        raise UserError("--workdir is required")
    return config_flag.value, workdir.value


def config_help(argv: list[str], doc: str, extra: dict[str, str] | None = None) -> str:
    """`--help` of a CLI that takes `parse_config_flags`' flags (and `extra`, flag -> help):
    the docstring, the flags and, when `--config` is given, every `--config.KEY` with its
    default, the loss's and network's options that the config file does not list included."""
    from core import config as config_lib

    flags = {
        "--config FILE[:VARIANT]": "experiment config (required), e.g. "
        "experiments/quickstart.py:smoke=True",
        "--workdir DIR": "run directory (required): created, or resumed",
        **(extra or {}),
        "--config.KEY=VALUE": "set a config key (typed by its default)",
    }
    lines = [doc.strip(), "", "flags:"]
    lines += [f"  {flag:<25} {text}" for flag, text in flags.items()]
    spec = config_lib.flag_value(argv, "config")
    if spec is None:
        lines += ["", "--config FILE --help also lists every --config.KEY with its default."]
        return "\n".join(lines)
    config = config_lib.load(spec)
    lines += ["", f"config keys of {spec} (--config.KEY=default):"]
    lines += [f"  --config.{key}={value}" for key, value in _flat_items(config)]
    for section in ("loss", "model"):
        options = config_lib.section_options(config, section, argv)
        if options is None:
            continue
        what, params = options
        settable = lambda p: p.default is None or isinstance(p.default, bool | int | float | str)
        unlisted = {k: p for k, p in params.items() if k not in config[section] and settable(p)}
        if unlisted:
            lines += ["", f"options of the {what} that the config does not list (defaults):"]
            lines += [f"  --config.{section}.{k}={p.default}" for k, p in unlisted.items()]
    return "\n".join(lines)


def _flat_items(node, prefix: str = ""):
    """`(dotted key, value)` of every leaf of a ConfigDict, in key order."""
    from ml_collections import ConfigDict

    for key in sorted(node.keys()):
        value = node[key]
        if isinstance(value, ConfigDict) and len(value):
            yield from _flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value.to_dict() if isinstance(value, ConfigDict) else value


def _without_flag(argv: list[str], name: str) -> list[str]:
    """`argv` without `--name value` / `--name=value` (its `--name.key` overrides stay)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == f"--{name}" and i + 1 < len(argv):
            skip = True
        elif not arg.startswith(f"--{name}="):
            out.append(arg)
    return out


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when launched as one of several processes.

    Auto-detected environments (Cloud TPU, SLURM, Open MPI) set their own variables;
    elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    import jax

    markers = (
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
    )
    if os.environ.get("DRIFTLAB_DISTRIBUTED") == "0" or not any(m in os.environ for m in markers):
        return
    if "SLURM_NTASKS" in os.environ and os.environ["SLURM_NTASKS"] == "1":
        return
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # CPU processes exchange collectives through gloo (GPUs and TPUs have their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def add_nll_solver_flags(parser) -> None:
    """The ODE likelihood's solver flags (`scripts.evaluate`, `scripts.nll_table`); read
    them back with `nll_solver_options`."""
    from metrics.likelihood import SOLVERS

    parser.add_argument(
        "--nll-solver", default="dopri5", choices=SOLVERS,
        help="ODE solver of the likelihood: dopri5 or tsit5 (adaptive, --nll-tol), rk4 "
        "(--nll-steps fixed steps)",
    )  # fmt: skip
    parser.add_argument("--nll-tol", type=float, default=1e-5, help="rtol = atol, adaptive solvers")
    parser.add_argument("--nll-steps", type=int, default=100, help="steps of --nll-solver rk4")


def add_heldout_num_flag(parser, *, default: int | None = None) -> None:
    """`--heldout-num`: how many examples of the held-out split the per-example metrics
    (nll, bpd, geo, accuracy) use (`core.evaluation.Options.heldout_num`)."""
    from core.evaluation.evaluator import CPU_HELDOUT_NUM

    auto = f" (default: all on an accelerator, {CPU_HELDOUT_NUM} on a CPU)"
    parser.add_argument(
        "--heldout-num", type=int, default=default, metavar="N",
        help="held-out examples of nll, bpd, geo, accuracy: a random subset (--seed) of the "
        "split; 0 = all" + (auto if default is None else ""),
    )  # fmt: skip


def nll_solver_options(args) -> dict:
    """`log_likelihood`'s solver keywords from `add_nll_solver_flags`' flags; a step count
    below 1 or a tolerance not above 0 is a UserError."""
    from metrics.likelihood import solver_options

    if args.nll_steps < 1:
        raise UserError(f"--nll-steps must be >= 1, got {args.nll_steps}")
    if not args.nll_tol > 0:
        raise UserError(f"--nll-tol must be > 0, got {args.nll_tol}")
    return solver_options(args.nll_solver, num_steps=args.nll_steps, tol=args.nll_tol)


def add_sampling_flags(parser, *, num: int | None) -> None:
    """The flags `sample_run` reads: which weights (`--ckpt-step --raw`), how many samples
    (`--num --batch --seed`; no `--num` when `num` is None) and how (`--sampler
    --sampling-steps --cfg --cfg-schedule --cfg-interval --sample-option`).
    `--steps` and `--step` are the older spellings of `--sampling-steps` and `--ckpt-step`."""
    if num is not None:
        parser.add_argument("--num", type=int, default=num)
    parser.add_argument("--batch", type=int, default=256, help="samples per device call")
    parser.add_argument(
        "--sampling-steps", "--steps", dest="steps", type=int, default=None,
        help="sampling steps (default: the config's)",
    )  # fmt: skip
    parser.add_argument("--sampler", default=None, help="default: the config's")
    parser.add_argument("--cfg", type=float, default=None, help="guidance weight (1 = none)")
    add_guidance_flags(parser)
    parser.add_argument(
        "--ckpt-step", "--step", dest="step", type=int, default=None,
        help="checkpoint step (default newest)",
    )  # fmt: skip
    parser.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    parser.add_argument("--seed", type=int, default=0)
    add_sample_option_flag(parser)


def add_guidance_flags(parser) -> None:
    """`--cfg-schedule` and `--cfg-interval` (beside `--cfg`, the weight): the guidance's
    schedule (`samplers.guidance.SCHEDULES`) and the interval of interval and dynamic."""
    parser.add_argument(
        "--cfg-schedule", default=None,
        help="guidance schedule: constant, interval, linear or dynamic (per-sample switch "
        "once the gap ||v_cond - v_null|| shrinks; ODE samplers) (default: the config's)",
    )  # fmt: skip
    parser.add_argument(
        "--cfg-interval", default=None, metavar="LO,HI",
        help="times t in [0, 1] (0 noise, 1 data) where interval and dynamic guide, e.g. 0.4,1.0",
    )  # fmt: skip


def add_sample_option_flag(parser) -> None:
    parser.add_argument(
        "--sample-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="sampler option over config.sample.options (repeatable), e.g. denoise=false",
    )


def parse_sample_options(pairs: list[str]) -> dict:
    """`["denoise=false", "inverse=jacobi"]` -> `{"denoise": False, "inverse": "jacobi"}`
    (values read as JSON where they parse, else as strings)."""
    import json

    from core.errors import UserError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--sample-option wants KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def sampling_kwargs(args) -> dict:
    """`core.runs.sample_run`'s keywords from the flags of `add_sampling_flags` (also taken
    by `core.evaluation.report.evaluate_run` and, but for the batch, `core.search`)."""
    return dict(
        batch_size=args.batch, seed=args.seed, step=args.step, ema=not args.raw,
        sampler=args.sampler, num_steps=args.steps, cfg_scale=args.cfg,
        cfg_schedule=args.cfg_schedule, cfg_interval=args.cfg_interval,
        sample_options=parse_sample_options(getattr(args, "sample_option", [])),
    )  # fmt: skip


def sample_run(args, *, want_samples: bool = True, label: int | None = None):
    """`core.runs.sample_run` with the flags of `add_sampling_flags` (`--workdir` too): the
    run's weights on a mesh of all devices and, if `want_samples`, `--num` samples."""
    from core import runs

    num = args.num if want_samples else None
    return runs.sample_run(args.workdir, num=num, label=label, **sampling_kwargs(args))

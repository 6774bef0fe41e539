"""Train an experiment:  python -m scripts.train --config experiments/quickstart.py --workdir runs/q

Overrides: `--config.batch_size=64`, and any option of the loss or network
(`--config.loss.ot_pairing=True`, listed in the config file or not); variants:
`--config experiments/x.py:smoke=True`. A workdir with checkpoints is resumed (a config
whose weights do not fit its checkpoint is refused before anything is written). The
experiment configs are under experiments/, each with its launch line in its docstring.
A network of another run is used frozen with `--config.frozen.NAME.workdir=RUN` (optional
`.step=N`, `.ema=False`): the loss gets it as `NAME_net`.

A resume lists its config changes; one that changes what the run was trained on (data,
model, loss, frozen networks) is refused unless `--allow-changes` is given. The newest
intact checkpoint is resumed (a damaged newer one is moved to damaged_checkpoints/). One
training per workdir at a time. SIGTERM / Ctrl-C stop with a checkpoint of the current
step (exit status 143 / 130); the same command resumes there.
"""

from scripts.common import config_help, maybe_initialize_distributed, parse_config_flags, run

ALLOW_CHANGES_HELP = "resume even where the config changes the data, model, loss or frozen networks"


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(config_help(argv, __doc__, {"--allow-changes": ALLOW_CHANGES_HELP}))
        return
    allow_changes = "--allow-changes" in argv
    argv = [a for a in argv if a != "--allow-changes"]
    config, workdir = parse_config_flags(argv)
    maybe_initialize_distributed()
    from core.experiment import Experiment
    from core.trainer import train

    train(Experiment.from_config(config), workdir, allow_changes=allow_changes)


if __name__ == "__main__":
    run(main)

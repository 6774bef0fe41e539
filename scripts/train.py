"""Train an experiment:  python -m scripts.train --config experiments/quickstart.py --workdir runs/q

Overrides: `--config.batch_size=64`; variants: `--config experiments/x.py:smoke=True`.
A workdir with checkpoints is resumed.
"""

from scripts.common import maybe_initialize_distributed, parse_config_flags, run


def main(argv: list[str]) -> None:
    config, workdir = parse_config_flags(argv)
    maybe_initialize_distributed()
    from core.trainer import train

    train(config, workdir)


if __name__ == "__main__":
    run(main)

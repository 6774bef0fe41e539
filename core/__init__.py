"""The trainer and everything that touches devices: sharding, checkpoints, logging.

`core.sharding` and `core.checkpoint` are the only importers of `jax.sharding` and orbax.
This package's `__init__` imports nothing heavy, so `core.errors` is cheap to import anywhere.
"""

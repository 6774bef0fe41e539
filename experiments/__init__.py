"""Experiment configs: `<method>/<dataset>_<net>.py`, each with `get_config(arg=None)`."""

"""Orbax checkpoints of a TrainState: async, keep-N, resumable, partial restore of weights.

Layout: `<workdir>/checkpoints/<step>/{params, ema, opt_state}`, and `teacher_ema` for a
run that keeps one. A save killed half-way leaves only a temporary folder, which Orbax
ignores; the last committed step is intact.
"""

import logging
import os

import jax
import orbax.checkpoint as ocp

from core.errors import UserError
from core.train_state import TrainState

ITEMS = ("params", "ema", "opt_state")
OPTIONAL_ITEMS = ("teacher_ema",)  # saved and restored when the state holds one


class _QuietReadOnly(logging.Filter):
    """Drops orbax's warnings that a directory opened read-only is read-only (we asked) and
    that an item folder has no step metadata (`Checkpoints.mismatches` reads one item)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not msg.startswith(("Given directory is read only", "Metadata file does not exist"))


logging.getLogger("absl").addFilter(_QuietReadOnly())


def _shapes(tree) -> dict[str, tuple]:
    """`{"blocks.0.fc1.kernel": shape}` of a tree of arrays or array metadata."""
    name = lambda path: ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {name(path): tuple(leaf.shape) for path, leaf in leaves}


def _items(state: TrainState) -> tuple[str, ...]:
    return ITEMS + tuple(k for k in OPTIONAL_ITEMS if getattr(state, k) is not None)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """A thin wrapper of `ocp.CheckpointManager` for TrainState."""

    def __init__(
        self,
        workdir: str,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,  # orbax warns about both when
            save_interval_steps=0 if read_only else 1,  # reading, unless they are unset
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS + OPTIONAL_ITEMS, options=options
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState) -> None:
        step = int(jax.device_get(state.step))
        args = {k: ocp.args.StandardSave(getattr(state, k)) for k in _items(state)}
        self._manager.save(step, args=ocp.args.Composite(**args))

    def restore(self, step: int, target: TrainState) -> TrainState:
        """Restore the items `target` holds into its structure, shapes and shardings
        (arrays or `jax.ShapeDtypeStruct`s with shardings)."""
        self._check_step(step)
        items = _items(target)
        for k in items:
            if not os.path.isdir(os.path.join(self.directory, str(step), k)):
                raise UserError(
                    f"the step-{step} checkpoint in {self.directory} has no {k!r} (the run "
                    f"was trained without it; {k}_decay adds it only to a new run)"
                )
        args = {k: ocp.args.StandardRestore(_abstract(getattr(target, k))) for k in items}
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return target.replace(
            step=jax.numpy.asarray(step, jax.numpy.int32), **{k: restored[k] for k in items}
        )

    def mismatches(self, step: int, target_params) -> list[str]:
        """How the stored `params` of `step` differ from `target_params` (arrays or
        `ShapeDtypeStruct`s), read from the checkpoint's metadata without restoring:
        `["blocks.0.fc1.kernel: stored (32, 32), wanted (64, 64)", ...]`; empty if they fit."""
        path = os.path.join(self.directory, str(step), "params")
        if not os.path.isdir(path):
            return []
        meta = ocp.StandardCheckpointer().metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        stored, wanted = _shapes(getattr(tree, "tree", tree)), _shapes(target_params)
        out = []
        for name in sorted(set(stored) | set(wanted)):
            a, b = stored.get(name), wanted.get(name)
            if a != b:
                out.append(f"{name}: stored {a or 'nothing'}, wanted {b or 'nothing'}")
        return out

    def restore_weights(self, target_params, *, step: int | None = None, ema: bool = True):
        """Only the (EMA) weights, e.g. for sampling; returns (step, params)."""
        step = self.resolve_step(step)
        item = "ema" if ema else "params"
        args = {item: ocp.args.StandardRestore(_abstract(target_params))}
        return step, self._manager.restore(step, args=ocp.args.Composite(**args))[item]

    def resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise UserError(f"no checkpoint found in {self.directory}")
        self._check_step(step)
        return step

    def _check_step(self, step: int) -> None:
        steps = self.all_steps()
        if step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise UserError(
                f"checkpoint step {step} not found in {self.directory} (available: {have})"
            )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def open_for_reading(workdir: str) -> Checkpoints:
    """Checkpoints of an existing run; a UserError if the workdir has none."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise UserError(f"no checkpoints in {workdir} (expected {checkpoint_dir(workdir)})")
    return Checkpoints(workdir, read_only=True, async_save=False)

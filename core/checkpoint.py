"""Orbax checkpoints of a TrainState: async, keep-N, resumable, partial restore of weights,
damage detected and the newest intact step used.

Layout: `<workdir>/checkpoints/<step>/{params, ema, opt_state, config}`, and `teacher_ema`
for a run that keeps one; `config` is the run's config.json as it was when the step was
trained (older runs' steps have none: their config.json stands for them). A save killed
half-way leaves only a temporary folder, which Orbax ignores; the last committed step is
intact.

Once a save has been committed, `files.json` beside its items records every file's size
and SHA-256 (written when the next save starts, or at `wait`/`close`). `damage(step)`
checks a step against it, and that each item's folder and metadata are there, before
anything is restored; `restore_intact` walks from the newest step to older ones past
damaged steps (a step without `files.json`, from older code or killed before it was
written, is checked by restoring it), saying on stderr which step it uses and why.
"""

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from typing import TypeVar

import jax
import orbax.checkpoint as ocp

from core.errors import UserError
from core.files import content_tag
from core.train_state import TrainState

ITEMS = ("params", "ema", "opt_state")
OPTIONAL_ITEMS = ("teacher_ema",)  # saved and restored when the state holds one
CONFIG_ITEM = "config"  # the config that trained the step (a JSON item)
FILES = "files.json"  # name, size and SHA-256 of each file of a committed step
DAMAGED_DIR = "damaged_checkpoints"  # where training moves damaged steps (never deleted)
T = TypeVar("T")


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


def items_of(state: TrainState) -> tuple[str, ...]:
    return ITEMS + tuple(k for k in OPTIONAL_ITEMS if getattr(state, k) is not None)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _file_table(step_dir: str) -> dict[str, list]:
    """`{relative path: [size, sha256]}` of every file under `step_dir` but `files.json`."""
    table = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel not in (FILES, FILES + ".tmp"):
                table[rel] = [os.path.getsize(path), content_tag(path, 64)]
    return table


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _say(message: str) -> None:
    """One line on stderr, from the main process only."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


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
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,  # orbax warns about both when
            save_interval_steps=0 if read_only else 1,  # reading, unless they are unset
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=(*ITEMS, *OPTIONAL_ITEMS, CONFIG_ITEM), options=options
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, config: dict | None = None) -> None:
        """Save `state` (asynchronously) and, with `config`, the config that trained it."""
        step = int(jax.device_get(state.step))
        args = {k: ocp.args.StandardSave(getattr(state, k)) for k in items_of(state)}
        if config is not None:
            args[CONFIG_ITEM] = ocp.args.JsonSave(config)
        self._manager.wait_until_finished()  # what orbax's save does first anyway
        self._record_files()
        self._manager.save(step, args=ocp.args.Composite(**args))

    def _record_files(self) -> None:
        """Write `files.json` into each committed step that has none (main process)."""
        if self.read_only or jax.process_index() != 0:
            return
        for step in self.all_steps():
            step_dir = os.path.join(self.directory, str(step))
            path = os.path.join(step_dir, FILES)
            if os.path.exists(path):
                continue
            table, tmp = _file_table(step_dir), path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(table, f, indent=0, sort_keys=True)
            os.replace(tmp, path)

    def damage(self, step: int, items=ITEMS) -> str | None:
        """What is wrong with the committed files of `step` for restoring `items`, read
        without restoring (None: nothing found): a file missing, shorter or longer, or
        changed since it was recorded, an item's folder or metadata missing."""
        step_dir = os.path.join(self.directory, str(step))
        # an optional item a run was trained without is not damage (`restore` says so)
        items = [k for k in items if k not in OPTIONAL_ITEMS or os.path.isdir(f"{step_dir}/{k}")]
        for k in items:
            if not os.path.isdir(os.path.join(step_dir, k)):
                return f"its {k}/ folder is missing"
        path = os.path.join(step_dir, FILES)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    recorded = json.load(f)
            except (OSError, ValueError) as e:
                return f"{FILES} unreadable ({_first_line(e)})"
            for rel, (size, digest) in sorted(recorded.items()):
                top = rel.split(os.sep)[0]
                if top != rel and top not in items:
                    continue  # a file of an item not restored here
                full = os.path.join(step_dir, rel)
                if not os.path.exists(full):
                    return f"{rel} is missing"
                if os.path.getsize(full) != size:
                    return f"{rel} has {os.path.getsize(full)} bytes, {size} were written"
                if content_tag(full, 64) != digest:
                    return f"{rel} differs from what was written (SHA-256)"
        for k in items:
            if not os.path.exists(os.path.join(step_dir, k, "_METADATA")):
                return f"{k}/_METADATA is missing"
        return None

    def restore_intact(
        self,
        restore: Callable[[int], T],
        *,
        step: int | None = None,
        items=ITEMS,
        move_damaged: bool = False,
    ) -> tuple[int, T]:
        """`(step, restore(step))` for the newest step that is intact (or the given `step`,
        which must be). A damaged step is skipped with one line on stderr naming the damage
        and the step used instead; with `move_damaged` (training, which will save those
        steps again) it is moved to `<workdir>/damaged_checkpoints/`, never deleted. No
        intact step is a UserError naming each damage. `restore` raising a UserError
        (the step does not fit the config) is not damage: it propagates."""
        steps = [self.resolve_step(step)] if step is not None else self.all_steps()[::-1]
        if not steps:
            raise UserError(f"no checkpoint found in {self.directory}")
        damaged = []
        for s in steps:
            reason = self.damage(s, items)
            if reason is None:
                try:
                    result = restore(s)
                except UserError:
                    raise
                except Exception as e:  # noqa: BLE001 - an unreadable step is damage
                    reason = f"restoring it failed: {_first_line(e)}"
                else:
                    if damaged:
                        self._report(damaged, s, move_damaged)
                    return s, result
            damaged.append((s, reason))
            if step is not None:
                break
        listed = "; ".join(f"step {s}: {r}" for s, r in damaged)
        raise UserError(f"no intact checkpoint in {self.directory} ({listed})")

    def _report(self, damaged: list, used: int, move: bool) -> None:
        for s, reason in damaged:
            where = ""
            if move and jax.process_index() == 0:
                target = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR, str(s))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                if os.path.exists(target):
                    shutil.rmtree(target)  # an older copy of the same step number
                os.replace(os.path.join(self.directory, str(s)), target)
                where = f"; moved to {target}"
            _say(
                f"warning: checkpoint step {s} in {self.directory} is damaged ({reason}); "
                f"using step {used}{where}"
            )
        if move:
            if jax.process_count() > 1:  # every process lists the steps after the move
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("driftlab: damaged steps moved")
            self._manager.reload()

    def saved_config(self, step: int) -> dict | None:
        """The config recorded with `step` (None for a step saved without one)."""
        if not os.path.isdir(os.path.join(self.directory, str(step), CONFIG_ITEM)):
            return None
        args = {CONFIG_ITEM: ocp.args.JsonRestore()}
        return self._manager.restore(step, args=ocp.args.Composite(**args))[CONFIG_ITEM]

    def restore(self, step: int, target: TrainState) -> TrainState:
        """Restore the items `target` holds into its structure, shapes and shardings
        (arrays or `jax.ShapeDtypeStruct`s with shardings)."""
        self._check_step(step)
        items = items_of(target)
        for k in OPTIONAL_ITEMS:
            if k in items and not os.path.isdir(os.path.join(self.directory, str(step), k)):
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
        """Only the (EMA) weights of `step`, e.g. for sampling; returns (step, params)."""
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
        self._record_files()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._record_files()
        self._manager.close()


def open_for_reading(workdir: str) -> Checkpoints:
    """Checkpoints of an existing run; a UserError if the workdir has none."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise UserError(f"no checkpoints in {workdir} (expected {checkpoint_dir(workdir)})")
    return Checkpoints(workdir, read_only=True, async_save=False)

"""Metrics to `metrics.jsonl` (one JSON object per line, with `step`) and TensorBoard.

Writes of the same step in a row merge into one line (the trainer logs `loss` at every
evaluation step, so evaluation numbers join the line that has the step's `loss`)."""

import json
import math
import os

import numpy as np


class MetricWriter:
    """Writes on the main process only; a no-op elsewhere."""

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        start_step: int | None = None,
    ):
        """`start_step`: a training resumed from that step, which redoes the steps after
        it: their lines in metrics.jsonl are dropped, and TensorBoard is told to purge its
        events after it (`purge_step`), so each step is logged once."""
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._last = None  # (step, row, offset of its line) of the last write
        self._tb = None
        if start_step is not None:
            self.truncate_after(start_step)
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            purge = start_step + 1 if start_step else None
            # tensorboardX names a file by the second and the host: a resume within the same
            # second would reuse (truncate) the earlier file without a suffix of its own
            suffix = f".step{start_step or 0}.pid{os.getpid()}"
            self._tb = SummaryWriter(
                os.path.join(workdir, "tensorboard"), purge_step=purge, filename_suffix=suffix
            )

    def truncate_after(self, step: int) -> None:
        """On resume from `step`, drop lines logged after it (those steps are redone)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.path)
        self._last = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _to_python(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            if self._last is not None and self._last[0] == row["step"]:
                row = {**self._last[1], **row}  # the same step again: one merged line
                f.truncate(self._last[2])
                f.seek(self._last[2])
            offset = f.tell()
            f.write(json.dumps(row) + "\n")
        self._last = (row["step"], row, offset)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float | int) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def image(self, step: int, name: str, image_hwc_uint8: np.ndarray) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(name, image_hwc_uint8, step, dataformats="HWC")
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict] | None:
    """The rows of `<workdir>/metrics.jsonl` in file order, or None when it has none."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _to_python(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()

"""Stateless batches (`Batches.get(step)`) and a background prefetcher.

The data order is a pure function of `(seed, step)`: the global batch of step `s` is
positions `[s*B, (s+1)*B)` of the endless concatenation of per-epoch permutations, epoch
`e`'s permutation drawn from `np.random.default_rng((seed, 0, e))`. Nothing depends on
history, so a run resumed at step `s` reads exactly what an uninterrupted run would have,
and the global batch does not depend on the number of hosts: host `p` of `P` takes rows
`[p*B/P, (p+1)*B/P)` of it.
"""

import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from core.errors import UserError

_PERMUTATION, _FLIP = 0, 1  # independent random streams of one seed


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the examples (cached: a batch spans <= 2)."""
    order = np.random.default_rng((seed, _PERMUTATION, epoch)).permutation(num_examples)
    order.flags.writeable = False
    return order


class Batches:
    """This host's part of the global batch of any step, on demand.

    `source` is a `data.Source`; `random_flip` flips images `[H, W, C]` left-right with a
    coin drawn from `(seed, step)` per row of the global batch.
    """

    def __init__(
        self,
        source,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        random_flip: bool = False,
    ):
        if global_batch_size < 1 or seed < 0:
            raise UserError(
                f"need global_batch_size >= 1 and seed >= 0, got {global_batch_size} and {seed}"
            )
        if process_count < 1 or global_batch_size % process_count:
            raise UserError(
                f"global batch size {global_batch_size} is not divisible by "
                f"the {process_count} processes"
            )
        if not 0 <= process_index < process_count:
            raise UserError(f"process_index {process_index} not in [0, {process_count})")
        if random_flip and len(source.example_shape) != 3:
            raise UserError(
                f"random_flip needs images [H, W, C], but examples have shape "
                f"{source.example_shape}"
            )
        if source.num_examples < 1:
            raise UserError("the data source is empty")
        self.source = source
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.local_batch_size = global_batch_size // process_count
        self.offset = process_index * self.local_batch_size
        self.random_flip = random_flip

    def steps_per_epoch(self) -> float:
        return self.source.num_examples / self.global_batch_size

    def indices(self, step: int) -> np.ndarray:
        """Example indices `[local_batch_size]` of this host's rows of step `step`."""
        n = self.source.num_examples
        start = step * self.global_batch_size + self.offset
        positions = np.arange(start, start + self.local_batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, n)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = epoch_permutation(self.seed, int(epoch), n)[offsets[mask]]
        return out

    def get(self, step: int) -> dict[str, np.ndarray]:
        """This host's batch for `step`: `{"x": float32 [b, ...], "cond"?: int32 [b]}`."""
        if step < 0:
            raise UserError(f"step must be >= 0, got {step}")
        batch = self.source.__getitems__(self.indices(step))
        if self.random_flip:
            coins = np.random.default_rng((self.seed, _FLIP, step)).random(self.global_batch_size)
            flip = coins[self.offset : self.offset + self.local_batch_size] < 0.5
            x = batch["x"]
            batch["x"] = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
        return batch

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """`get(start_step)`, `get(start_step + 1)`, ... forever."""
        step = start_step
        while True:
            yield self.get(step)
            step += 1


_ITEM, _END, _ERROR = range(3)


def _offer(q: queue.Queue, message: tuple, stop: threading.Event) -> bool:
    """Put `message` unless the consumer has stopped; whether it was put."""
    while not stop.is_set():
        try:
            q.put(message, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(items: Iterable, put: Callable, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in items:
            if not _offer(q, (_ITEM, put(item)), stop):
                return
        _offer(q, (_END, None), stop)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        _offer(q, (_ERROR, e), stop)


def prefetch(
    items: Iterable, size: int = 2, put: Callable[[Any], Any] = lambda b: b
) -> "Prefetcher":
    """`put(item)` for each item, computed by a background thread up to `size` ahead.

    The thread starts at once (so batches are ready while the step compiles). An exception
    in `items` or `put` is raised by the consumer's `next`, with its traceback. `close()`
    (also on `with` exit and when dropped) stops the thread after its current item.
    """
    if size < 1:
        raise UserError(f"prefetch size must be >= 1, got {size}")
    return Prefetcher(items, size, put)


class Prefetcher(Iterator):
    """The iterator `prefetch` returns."""

    def __init__(self, items: Iterable, size: int, put: Callable[[Any], Any]):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=_produce,
            args=(iter(items), put, self._queue, self._stop),
            name="driftlab-prefetch",
            daemon=True,
        )
        self._thread.start()

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self.close()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        self._done = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()

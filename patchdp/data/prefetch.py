"""Host-side prefetching: load the next batches in a background thread while the device
computes on the current one.

    batches = Prefetcher(lambda b: (b, dataset.get_batch(b.indices)), sampler_batches)
    with batches:
        for sampled, batch in batches:
            state = train_step(state, batch, ...)

``load`` runs on one background thread, in order; results come out in the order of
``items``. Decoding (PIL, numpy, array-record reads) releases the GIL, so it overlaps
with the main thread's JAX dispatch; ``load`` may also ``jax.device_put`` its result to
overlap the host-to-device copy.

The thread runs ahead: it has taken up to ``depth + 1`` items from ``items`` beyond the
one the consumer holds. Whoever checkpoints the position of ``items`` (a sampler's state)
must record it per consumed item — e.g. let each item carry its own step number — not
read it off the iterator.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")

_POLL_SECONDS = 0.1


class Prefetcher(Iterator):
    """Iterate over ``load(item)`` for ``item`` in ``items``, computed ``depth`` ahead.

    An exception raised by ``load`` or by ``items`` is re-raised by ``next`` at its
    position in the sequence. ``close()`` (or leaving the ``with`` block) stops the thread.
    """

    def __init__(self, load: Callable[[T], U], items: Iterable[T], depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}.")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._work, args=(load, items), daemon=True)
        self._thread.start()

    def _work(self, load, items):
        try:
            for item in items:
                if not self._put(("value", load(item))):
                    return
        except BaseException as error:  # handed to the consumer, re-raised there
            self._put(("error", error))
        else:
            self._put(("end", None))

    def _put(self, entry) -> bool:
        """Queue ``entry`` unless closed meanwhile; False when closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> U:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "value":
            return value
        self._done = True
        self._thread.join()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the background thread (it finishes the ``load`` call it is in)."""
        self._done = True
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

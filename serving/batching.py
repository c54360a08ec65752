"""Continuous batching: the uploads of concurrent requests are prepared and computed together.

A request's items (uploads) join a queue; when the model is idle, everything queued (up to ``max_batch_size``
items) is taken by one worker thread, which prepares each item (decodes and checks it: a bad one fails its own
caller only) and computes the good ones in one model call, so the event loop keeps accepting requests and the next
batch gathers meanwhile. A lone request is computed at once (no waiting window), so batching costs nothing at low
load and the batch grows with the load by itself.

Measured (``benchmarks/serve.py``, 2 cores, the 64 px atto model, concurrency 32): against BentoML's adaptive
batching in a separate model service, 255-363 images/s against 194 (that service's HTTP round trip per call cost
more CPU than its batching saved, so the model lives in the API process and this batcher merges that process's
requests); preparing each batch's uploads in its model thread, rather than one thread hop per upload, raised
0.57 of the in-process throughput to 0.62-0.63 (against a fresh process's in-process figure, which glibc's
allocator then kept about a fifth below its later one: ``benchmarks/serve.py`` now measures the later state).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

Item = TypeVar("Item")


class Batcher(Generic[Item]):
    """Merges concurrent calls into model calls of at most ``max_batch_size`` items.

    Args:
        prepare: one item -> its model input (one row), run in the batch's worker thread; what it raises fails that
            item's caller only.
        model: stacked inputs (N, ...) -> outputs (N, ...); it must treat rows independently.
        max_batch_size: the most items one model call gets.
    """

    def __init__(self, prepare: Callable[[Item], np.ndarray], model: Callable[[np.ndarray], np.ndarray],
                 max_batch_size: int) -> None:
        self.prepare, self.model, self.max_batch_size = prepare, model, max_batch_size
        self._queue: list[tuple[Item, asyncio.Future]] = []
        self._draining: asyncio.Task | None = None

    async def __call__(self, item: Item) -> np.ndarray:
        """The model's output row for ``item``, computed together with whatever else is queued.

        Raises:
            Exception: what ``prepare`` raised for this item, or the model call's error.
        """
        answer = asyncio.get_running_loop().create_future()
        self._queue.append((item, answer))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        return await answer

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:self.max_batch_size], self._queue[self.max_batch_size:]
                try:
                    results = await asyncio.to_thread(self._compute, [item for item, _ in batch])
                except Exception as error:  # every caller of this batch gets the model's error
                    results = [error] * len(batch)
                for (_, answer), result in zip(batch, results, strict=True):
                    if answer.done():       # a caller that timed out or disconnected has cancelled its future
                        continue
                    if isinstance(result, Exception):
                        answer.set_exception(result)
                    else:
                        answer.set_result(result)
        finally:
            self._draining = None

    def _compute(self, items: list[Item]) -> list[np.ndarray | Exception]:
        prepared: list[np.ndarray | Exception] = []
        for item in items:
            try:
                prepared.append(self.prepare(item))
            except Exception as error:  # noqa: BLE001 (this item's own failure, given to its caller)
                prepared.append(error)
        good = [row for row in prepared if not isinstance(row, Exception)]
        outputs = iter(self.model(np.stack(good)) if good else [])
        return [row if isinstance(row, Exception) else next(outputs) for row in prepared]

"""Continuous batching: the images of concurrent requests go through the model together.

A request's images join a queue; when the model is idle, everything queued (up to ``max_batch_size`` images) is
computed in one call, in a thread so the event loop keeps accepting requests, and while that call runs the next
batch gathers. A lone request is computed at once (no waiting window), so batching costs nothing at low load and
the batch grows with the load by itself.

Measured against BentoML's adaptive batching in a separate model service (``benchmarks/serve.py``, 2 cores, the
64 px atto model, concurrency 32): 255-363 images/s against 194. The model service's own HTTP round trip per call
cost more CPU than its batching saved, so the model lives in the API process and this batcher merges that
process's requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np


class Batcher:
    """Merges concurrent calls into model calls of at most ``max_batch_size`` images.

    Args:
        model: images (N, ...) -> outputs (N, ...), run in a worker thread; it must treat rows independently.
        max_batch_size: the most images one model call gets (a request larger than that is computed alone).
    """

    def __init__(self, model: Callable[[np.ndarray], np.ndarray], max_batch_size: int) -> None:
        self.model, self.max_batch_size = model, max_batch_size
        self._queue: list[tuple[np.ndarray, asyncio.Future]] = []
        self._draining: asyncio.Task | None = None

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        """The model's outputs for ``images``, computed together with whatever else is queued."""
        answer = asyncio.get_running_loop().create_future()
        self._queue.append((images, answer))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        return await answer

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._take()
                try:
                    outputs = await asyncio.to_thread(self.model, np.concatenate([images for images, _ in batch]))
                except Exception as error:  # every caller of this batch gets the model's error
                    for _, answer in batch:
                        if not answer.done():
                            answer.set_exception(error)
                    continue
                start = 0
                for images, answer in batch:
                    if not answer.done():   # a caller that timed out or disconnected has cancelled its future
                        answer.set_result(outputs[start:start + len(images)])
                    start += len(images)
        finally:
            self._draining = None

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        taken, size = 0, 0
        while taken < len(self._queue) and (taken == 0 or size + len(self._queue[taken][0]) <= self.max_batch_size):
            size += len(self._queue[taken][0])
            taken += 1
        batch, self._queue = self._queue[:taken], self._queue[taken:]
        return batch

"""Workers sharing one listening socket split a burst of new connections (``serving.connections``)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
from collections import Counter

from serving.connections import pace_accepts


class _SaysWhoAccepted(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(f"{os.getpid()}\n".encode())


def _worker(sock: socket.socket, workers: int, ready: multiprocessing.synchronize.Event) -> None:
    pace_accepts(workers)
    pace_accepts(workers)       # a second call changes nothing

    async def serve() -> None:
        await asyncio.get_running_loop().create_server(_SaysWhoAccepted, sock=sock, backlog=128)
        ready.set()
        await asyncio.sleep(120)

    asyncio.run(serve())


def _bursts(workers: int, bursts: int, connections: int = 32) -> list[list[int]]:
    """Connections accepted by each worker, most first, for each burst of new connections."""
    context = multiprocessing.get_context("fork")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(128)
        port = listening.getsockname()[1]
        readies = [context.Event() for _ in range(workers)]
        processes = [context.Process(target=_worker, args=(listening, workers, ready), daemon=True)
                     for ready in readies]
        for process in processes:
            process.start()
        try:
            assert all(ready.wait(30) for ready in readies)
            splits = []
            for _ in range(bursts):
                opened = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(connections)]
                splits.append(sorted(Counter(c.makefile().readline() for c in opened).values(), reverse=True))
                for connection in opened:
                    connection.close()
            return splits
        finally:
            for process in processes:
                process.terminate()
                process.join(10)


def test_a_burst_of_connections_spreads_over_the_workers():
    """Two workers on one socket, four bursts of 32 connections, each burst closed before the next (so the count a
    worker holds must come back down): each worker takes at least a quarter of every burst. (Accepting as asyncio
    does by default, one worker took 24-32 of a burst in four bursts of six here.)"""
    splits = _bursts(workers=2, bursts=4)
    assert all(len(split) == 2 and split[1] >= 8 for split in splits), splits


def test_a_single_worker_accepts_every_connection_of_a_burst():
    assert _bursts(workers=1, bursts=1) == [[32]]

"""How the API's workers share new connections: a worker that holds more waits longer before accepting the next.

BentoML's workers all accept on one listening socket (opened by its arbiter). asyncio accepts every connection
pending when that socket turns readable (up to uvicorn's backlog, 2,048), so on a burst of new connections the
worker that runs first takes them all and, as clients keep connections alive, serves them alone while the other
workers idle: in ``benchmarks/serve.py`` one worker of two took all 32 connections in about one round in three
(403-478 images/s against 566-589 when they split). Here each worker accepts one connection per turn and then, while
it holds ``n`` open connections, leaves the socket to the others for ``n`` x ``PACE_SECONDS``: the worker holding
fewest accepts first, a burst spreads over the workers, and a single worker only delays its next accept a little.
The kernel's queue of pending connections keeps its size (uvicorn still passes its backlog to ``listen``).
"""

from __future__ import annotations

import asyncio.selector_events
import socket
from collections.abc import Callable

PACE_SECONDS = 0.0005
_LOOP = asyncio.selector_events.BaseSelectorEventLoop


def pace_accepts(workers: int) -> None:
    """Makes this process's asyncio servers accept one connection per turn, paced by the connections held.

    Args:
        workers: how many processes accept on the socket; with one, accepts are not paced (only one per turn).
    """
    if getattr(_LOOP._start_serving, "paced", False):
        return

    def start_serving(loop: asyncio.selector_events.BaseSelectorEventLoop,
                      protocol_factory: Callable[[], asyncio.Protocol], sock: socket.socket, sslcontext: object = None,
                      server: asyncio.Server | None = None, backlog: int = 100, *args: object) -> None:
        # ``backlog`` only bounds how many connections one readiness event accepts; ``listen`` has had it already.
        held = 0

        def counted() -> asyncio.Protocol:
            nonlocal held
            protocol = protocol_factory()
            connection_lost = protocol.connection_lost

            def lost(exc: Exception | None) -> None:
                nonlocal held
                held -= 1
                connection_lost(exc)

            protocol.connection_lost = lost
            held += 1
            return protocol

        def accept() -> None:
            loop._accept_connection(counted, sock, sslcontext, server, 1, *args)
            # (Out of file descriptors, asyncio has removed the reader itself and retries later: no pause then.)
            if workers > 1 and held and loop._remove_reader(sock.fileno()):
                loop.call_later(held * PACE_SECONDS, resume)

        def resume() -> None:
            if sock.fileno() >= 0 and (server is None or server.is_serving()):
                loop._add_reader(sock.fileno(), accept)

        loop._add_reader(sock.fileno(), accept)

    start_serving.paced = True
    _LOOP._start_serving = start_serving

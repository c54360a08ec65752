"""The inference API's guards: size limit, bearer-token auth, JSON error bodies, 4xx log lines, files only.

The first two answer in JSON before the request reaches BentoML: 413 for a body over the limit (checked on the
declared length and again while the body streams in, so a chunked upload cannot slip past), 401 for a missing
or wrong token. The token is compared in constant time; health checks stay open for orchestrators. A client
error is logged as one INFO line, never with a traceback. An image sent as text instead of a file is a 400, not
a URL for the server to fetch.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable

from pydantic import ValidationError

HEALTH_PATHS = frozenset({"/healthz", "/livez", "/readyz"})
Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


async def _reply(send: Send, status: int, message: str, headers: tuple = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuses request bodies above ``max_bytes`` with 413.

    A body without a declared length (chunked) is read in full, up to the limit, before the app sees any of it:
    an app that finds its body cut off mid-parse answers 500, so the refusal has to come first.
    """

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Passes the request on, or answers 413 when its body is (or turns out to be) too large."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_large = f"request body exceeds the {self.max_bytes} byte limit; send a smaller image"
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                return await _reply(send, 413, too_large)
            return await self.app(scope, receive, send)     # the server stops a body at its declared length
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":     # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await _reply(send, 413, too_large)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()                # after the body: disconnect, as the server would send
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


class BearerAuth:
    """Requires ``Authorization: Bearer <token>`` on every route but the health checks, when a token is set.

    The token is read from the environment variable ``token_env`` at start-up; unset or empty disables auth.
    """

    def __init__(self, app: Callable, token_env: str) -> None:
        self.app = app
        self.token = os.environ.get(token_env, "").encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Passes the request on, or answers 401 without the right token."""
        if scope["type"] != "http" or not self.token or scope["path"] in HEALTH_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            return await _reply(send, 401, "missing or invalid bearer token", ((b"www-authenticate", b"Bearer"),))
        return await self.app(scope, receive, send)


class JsonErrors:
    """Gives every 4xx answer the body ``{"error": message}``.

    BentoML 1.4.40 wraps its own in a one-item list, and says of a request that fails validation only how many fields
    failed (their names and reasons go into ``error``).
    """

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Passes the request on and unwraps list-shaped 4xx error bodies."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict | None = None

        async def unwrapping_send(message: dict) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                held = message              # wait for the body: its length may change
                return
            if held is not None and message["type"] == "http.response.body" and not message.get("more_body"):
                body = message.get("body", b"")
                try:
                    data = json.loads(body)
                except ValueError:
                    data = None
                if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
                    body = json.dumps(data[0]).encode()
                elif isinstance(data, dict) and (fields := _field_errors(data.get("detail"))):
                    body = json.dumps({**data, "error": fields}).encode()
                headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
                await send({**held, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                held = None
                return await send({**message, "body": body})
            if held is not None:            # a streamed 4xx body: pass it on as it is
                await send(held)
                held = None
            await send(message)

        await self.app(scope, receive, unwrapping_send)


def _field_errors(detail: object) -> str | None:
    """One line naming each invalid field and why, from the details of BentoML's 400 for an invalid request."""
    if not detail or not isinstance(detail, list) or not all(isinstance(e, dict) and "msg" in e for e in detail):
        return None
    return "; ".join(f"{'.'.join(str(part) for part in e.get('loc', ())) or 'request'}: {e['msg']}" for e in detail)


class _ClientErrorLine(logging.Filter):
    """Turns BentoML's ERROR record with traceback for a 4xx answer into one INFO line: route, status, error class.

    A bad upload is the client's problem, not the server's: a traceback per bad image would bury real errors.
    The message of the error is left out too (it can quote the upload); 5xx records are left as they are.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        status = getattr(getattr(error, "error_code", None), "value", None)
        if isinstance(error, ValidationError):
            status = 400
        if status is None or not 400 <= status < 500:
            return True
        route = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = "client error on %s: %s %s", (route, status, type(error).__name__)
        record.exc_info = record.exc_text = None
        return True


def quiet_client_errors() -> None:
    """Installs the one-line 4xx log record on BentoML's HTTP app logger (once per process)."""
    logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, _ClientErrorLine) for f in logger.filters):
        logger.addFilter(_ClientErrorLine())


async def _never_download(value: object) -> object:
    return value        # a text value stays text: ``serving.uploads.Upload`` refuses it with a 400 naming the field


def refuse_url_uploads() -> None:
    """Keeps a file field sent as text from becoming a download.

    BentoML's multipart parsing (``MultipartSerde.ensure_file``, BentoML 1.4) fetches a file field that arrives as
    text as a URL: the API would request any address a client names, from inside the network that holds the
    radiographs (and, without ``uvloop``, its address check fails and the answer is a 500). Here the text is passed
    on as it is, and the field's type (``Upload``) takes files only.
    """
    from _bentoml_impl.serde import MultipartSerde

    MultipartSerde.ensure_file = staticmethod(_never_download)

"""The API's ASGI middleware on its own, around a plain ASGI app: size limit, bearer auth, JSON error bodies."""

import json

import httpx
import pytest

from serving.security import BearerAuth, BodyLimit, JsonErrors

# BentoML's answer to a request that fails validation (two fields here)
VALIDATION_ERROR = {"error": "2 validation errors for Input",
                    "detail": [{"type": "missing", "loc": ["image"], "msg": "Field required"},
                               {"type": "upload_type", "loc": ["images", 0], "msg": "send the image as a file upload"}]}


async def echo(scope, receive, send):
    """Reads the whole body and answers with its length (or BentoML-style 400s on /bad and /invalid)."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    status, body = {"/bad": (400, json.dumps([{"error": "bad image"}])),
                    "/invalid": (400, json.dumps(VALIDATION_ERROR))}.get(scope["path"], (200, str(size)))
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body.encode()})


def client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.anyio
async def test_body_limit_refuses_declared_and_streamed_bodies_over_the_limit():
    async with client(BodyLimit(echo, max_bytes=10)) as http:
        assert (await http.post("/predict", content=b"x" * 10)).text == "10"
        declared = await http.post("/predict", content=b"x" * 11)
        assert declared.status_code == 413 and "10 byte limit" in declared.json()["error"]

        async def chunks():
            for _ in range(3):
                yield b"xxxx"
        streamed = await http.post("/predict", content=chunks())          # no content-length header
        assert streamed.status_code == 413


@pytest.mark.anyio
async def test_bearer_auth_guards_every_route_but_health_checks(monkeypatch):
    monkeypatch.setenv("TEST_TOKEN", "s3cret")
    async with client(BearerAuth(echo, token_env="TEST_TOKEN")) as http:
        assert (await http.post("/predict")).status_code == 401
        assert (await http.post("/predict", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await http.post("/predict", headers={"Authorization": "Basic s3cret"})).status_code == 401
        assert (await http.post("/predict", headers={"Authorization": "Bearer s3cret"})).status_code == 200
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/readyz")).status_code == 200 and (await http.get("/healthz")).status_code == 200
    monkeypatch.setenv("TEST_TOKEN", "")
    async with client(BearerAuth(echo, token_env="TEST_TOKEN")) as http:
        assert (await http.post("/predict")).status_code == 200          # no token configured: open


@pytest.mark.anyio
async def test_json_errors_unwrap_bentoml_list_bodies_name_invalid_fields_and_fix_the_length():
    async with client(JsonErrors(echo)) as http:
        bad = await http.post("/bad")
        assert bad.status_code == 400 and bad.json() == {"error": "bad image"}
        assert int(bad.headers["content-length"]) == len(bad.content)
        assert (await http.post("/ok", content=b"abc")).text == "3"
        invalid = await http.post("/invalid")
        assert invalid.json() == {"error": "image: Field required; images.0: send the image as a file upload",
                                  "detail": VALIDATION_ERROR["detail"]}
        assert int(invalid.headers["content-length"]) == len(invalid.content)


@pytest.fixture
def anyio_backend():
    return "asyncio"

"""The inference API: the BentoML service with its middleware, served in-process as the ASGI app `bentoml serve`
runs (routes, conversions, bad input, size limit), and once for real by `bentoml serve` on 127.0.0.1 (a smoke test of
the server, its auth and concurrency). The model is the tiny study's champion, imported from its registry."""

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import httpx
import mlflow
import numpy as np
import pydicom
import pytest
from PIL import Image
from starlette.testclient import TestClient

from models.convnext import predict
from models.preprocessing import load_image
from models.registry import get_version
from models.weights import load_model
from pipelines.data.store import open_site
from serving.launch import running_server
from serving.model_store import import_registered
from serving.settings import load_serving_config

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_project")]
TOKEN = "s3cret-token-for-tests"


class Study:
    """The tiny study's project as the service sees it: its params, registry and champion imported to BentoML."""

    def __init__(self, project):
        self.project, self.root = project, project.root
        self.config = load_serving_config(project.root / "params.yaml")

    def version(self, alias):
        mlflow.set_tracking_uri(self.project.tracking_uri)
        return get_version(self.config.registered_model, alias)


@pytest.fixture(scope="module")
def study(tiny_project):
    """The champion imported into the session's BentoML store; the service reads the project's params."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DP_CXR_PARAMS",
                                            "DP_CXR_API_TOKEN")}
    os.environ["MLFLOW_TRACKING_URI"] = tiny_project.tracking_uri
    os.environ["DP_CXR_PARAMS"] = str(tiny_project.root / "params.yaml")
    # An in-process stage of this worker may have pointed MLflow's process-wide store elsewhere.
    mlflow.set_tracking_uri(tiny_project.tracking_uri)
    mlflow.set_registry_uri(tiny_project.tracking_uri)
    try:
        study = Study(tiny_project)
        import_registered(study.config)
        yield study
    finally:
        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(None)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(autouse=True, scope="module")
def _torch_threads():
    """A service instance sets torch's thread count for its worker process; later tests in this one keep theirs."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(study):
    """The service's ASGI app (BentoML's, with the project's middleware), started as `bentoml serve` starts it.

    One per process: BentoML registers the app's metrics globally. Auth is tested around a plain ASGI app
    (test_security.py) and on the real server below.
    """
    os.environ["DP_CXR_API_TOKEN"] = ""
    from serving.service import CXRClassifier

    with TestClient(CXRClassifier.to_asgi(), raise_server_exceptions=False) as client:
        yield client


def _test_image(study, site="synthetic-uka-cxr-inhouse"):
    meta = open_site(study.root / "artifacts/prepare" / site).metadata
    return study.root / meta[meta["split"] == "test"]["path"].iloc[0]


def test_predict_equals_the_offline_model_and_carries_the_registry_guarantee(study, client):
    image = _test_image(study)
    answer = client.post("/predict", files={"image": (image.name, image.read_bytes(), "image/png")})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    registered = study.version("champion")
    model, spec = load_model(study.root / "artifacts/train" / registered.tags["cell"])
    offline = predict(model, load_image(image, spec.image_size)[None])[0]
    served = np.array([body["probabilities"][label] for label in spec.labels])
    assert np.max(np.abs(served - offline)) < 1e-5
    assert body["privacy"] == {k.removeprefix("privacy."): v for k, v in registered.tags.items()
                               if k.startswith("privacy.")}
    assert body["privacy"]["data_version"] == registered.tags["data_version"]       # the training data version
    assert float(body["privacy"]["epsilon_cell"]) <= 8.0 + 0.02 and body["privacy"]["unit"] == "image"
    assert float(body["privacy"]["epsilon"]) >= float(body["privacy"]["epsilon_cell"])   # the choice is charged
    assert body["model"]["version"] == registered.version and body["model"]["alias"] == "champion"
    assert all(body["decisions"][k] == (body["probabilities"][k] >= body["thresholds"][k]) for k in spec.labels)


def test_the_api_page_offers_file_uploads(client):
    """The OpenAPI document (the /docs page's source) declares each image field a multipart file."""
    api = client.get("/docs.json").json()
    for route, field in (("/predict", "image"), ("/predict_batch", "images")):
        content = api["paths"][route]["post"]["requestBody"]["content"]
        assert list(content) == ["multipart/form-data"], route
        schema = content["multipart/form-data"]["schema"]
        properties = api["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]["properties"] \
            if "$ref" in schema else schema["properties"]
        declared = properties[field].get("items", properties[field])
        assert declared["format"] == "binary" and declared["type"] in {"file", "string"}, (route, declared)


def test_requests_are_not_traced_unless_tracing_is_asked_for(client):
    """``serve.tracing: false`` (the tiny study's, as the default): BentoML's OpenTelemetry middleware, which would
    build a span per request, passes every route by."""
    app = client.app
    while not hasattr(app, "user_middleware"):     # BentoML's app under the test client's wrappers
        app = app.app
    tracing = next(m for m in app.user_middleware if m.cls.__name__ == "OpenTelemetryMiddleware")
    excluded = tracing.kwargs["excluded_urls"]
    assert all(excluded.url_disabled(f"http://testserver{route}") for route in ("/predict", "/predict_batch",
                                                                               "/privacy"))


def test_dicom_and_odd_modes_are_converted(study, client):
    dicom = next((study.root / "data/synthetic-vindr-cxr").rglob("*.dicom"))
    assert client.post("/predict", files={"image": ("x.dcm", dicom.read_bytes())}).status_code == 200
    gray = Image.open(_test_image(study)).convert("L")
    for mode, fmt in (("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("LA", "PNG")):
        buffer = io.BytesIO()
        (gray.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(gray, np.uint16) * 257)).save(
            buffer, format=fmt)
        answer = client.post("/predict", files={"image": (f"x.{fmt.lower()}", buffer.getvalue())})
        assert answer.status_code == 200, (mode, answer.text)


def test_batch_answers_each_image(study, client):
    image = _test_image(study).read_bytes()
    answer = client.post("/predict_batch", files=[("images", ("a.png", image)), ("images", ("b.png", b"nonsense")),
                                                ("images", ("c.png", image))])
    assert answer.status_code == 200, answer.text
    first, bad, third = answer.json()
    assert first["probabilities"] == third["probabilities"] and "error" in bad
    assert first["privacy"]["epsilon"] == bad["privacy"]["epsilon"]


def test_privacy_route_equals_the_record_bound_to_the_weights_and_the_registry_tags(study, client):
    import bentoml

    body = client.post("/privacy", json={}).json()
    tags = study.version("champion").tags
    stored = bentoml.models.get(body["model"]["bento_model"])
    record = json.loads(Path(stored.path_of("privacy.json")).read_text())
    assert body["privacy"] == record == {k.removeprefix("privacy."): v for k, v in tags.items() if k.startswith("privacy.")}
    assert record["weights_sha256"] == hashlib.sha256(Path(stored.path_of("model.safetensors")).read_bytes()).hexdigest()
    assert stored.tag.version == record["weights_sha256"][:32]        # the stored model is keyed on its weights
    assert float(record["epsilon"]) >= float(record["epsilon_cell"])    # the choice among candidates is charged
    assert body["statement"]["selection"].startswith("best-of-grid: chosen among domain-8-micro-0.5-0, ")
    assert "every intermediate model" in body["statement"]["protected"]
    assert body["privacy"]["epsilon"] == tags["privacy.epsilon"] and body["privacy"]["delta"] == tags["privacy.delta"]
    assert body["privacy"]["accountant"] == tags["privacy.accountant"] == "prv"
    assert body["card"]["test_mean_auroc"] == tags["test_mean_auroc"]
    assert "Noise seed: secret" not in body["card"]["model_card"]
    assert "fresh 256-bit seed from the OS CSPRNG" in body["card"]["model_card"]
    baseline = study.version("non-private-baseline").tags
    assert baseline["privacy.epsilon"] == "inf" and baseline["privacy.accountant"] == "none"


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares huge dimensions and holds almost nothing (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def _dicom(study, preamble: bytes = b"\x00" * 128, sop_class: str | None = None, pixels: bool = True) -> bytes:
    dicom = next((study.root / "data/synthetic-vindr-cxr").rglob("*.dicom"))
    ds = pydicom.dcmread(dicom)
    ds.PatientName = "SECRETNAME^PATIENT"
    if sop_class:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    if not pixels:
        del ds.PixelData
    ds.preamble = preamble
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def hostile_corpus(study) -> dict[str, tuple[bytes, int]]:
    """Uploads an attacker or a broken client sends, each with the status it must get (every one a 4xx)."""
    png = _test_image(study).read_bytes()
    gray = Image.open(_test_image(study)).convert("L")
    jpeg = _encoded(gray, "JPEG")
    sof = jpeg.index(b"\xff\xc0")          # the JPEG frame header: declare 30000 x 30000 pixels
    jpeg_bomb = jpeg[:sof + 5] + struct.pack(">HH", 30000, 30000) + jpeg[sof + 9:]
    dicom = _dicom(study)
    return {
        "empty upload": (b"", 415),
        "non-image bytes": (b"this is not an image at all", 415),
        "unsupported format (GIF)": (_encoded(Image.new("L", (128, 128)), "GIF"), 415),
        "unsupported format (BMP)": (_encoded(gray, "BMP"), 415),
        "PDF": (b"%PDF-1.7\n1 0 obj <<>> endobj\n%%EOF", 415),
        "GIF/JAR polyglot": (_encoded(Image.new("L", (128, 128)), "GIF") + b"PK\x03\x04" + b"\x00" * 64, 415),
        "PNG signature over HTML": (png[:8] + b"<html><script>alert(1)</script></html>", 415),
        "truncated PNG": (png[: len(png) // 2], 400),
        "truncated JPEG header": (jpeg[:200], 400),
        "truncated JPEG body": (jpeg[: len(jpeg) // 2], 400),
        "truncated DICOM": (dicom[: len(dicom) // 2], 400),
        "decompression bomb (PNG)": (_png_header(20000, 20000), 400),
        "decompression bomb (JPEG)": (jpeg_bomb, 400),
        "DICOM with a non-zero preamble (MZ polyglot)": (_dicom(study, preamble=b"MZ" + b"\x90" * 126), 400),
        "DICOM that is not an image (SR)": (_dicom(study, sop_class="1.2.840.10008.5.1.4.1.1.88.11"), 400),
        "DICOM without pixel data": (_dicom(study, pixels=False), 400),
        "1 x 1 pixel PNG": (_encoded(Image.new("L", (1, 1), 128), "PNG"), 400),
        "48 x 48 JPEG thumbnail": (_encoded(gray.resize((48, 48)), "JPEG"), 400),
    }


@contextlib.contextmanager
def listener():
    """An HTTP server on 127.0.0.1 that records the paths it is asked for: (its URL, the list of paths)."""
    asked: list[str] = []

    class Record(BaseHTTPRequestHandler):
        def do_GET(self):  # the name http.server dispatches GET requests to
            asked.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", asked
    finally:
        server.shutdown()
        server.server_close()


def assert_text_is_no_upload(post):
    """An image sent as text or JSON (a URL) is a 400 naming what to send, and the server requests nothing."""
    with listener() as (url, asked):
        for route, field in (("predict", "image"), ("predict_batch", "images")):
            for sent in ({"data": {field: f"{url}/{route}.png"}},
                         {"json": {field: f"{url}/{route}.png" if route == "predict" else [f"{url}/{route}.png"]}}):
                answer = post(route, **sent)
                assert answer.status_code == 400, (route, sent, answer.status_code, answer.text)
                assert "send the image as a file upload" in answer.json()["error"], (route, sent)
    assert asked == []


def test_bad_input_gets_a_4xx_json_error_never_a_500(study, client, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    for name, (payload, status) in hostile_corpus(study).items():
        answer = client.post("/predict", files={"image": ("upload", payload)})
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        assert answer.json()["error"], name
    tiny = client.post("/predict", files={"image": ("x.png", _encoded(Image.new("L", (1, 1)), "PNG"))}).json()
    assert tiny["error"].startswith("image of 1x1 pixels is below the minimum side of 64 px")
    client_errors = [r for r in caplog.records if r.getMessage().startswith("client error on /predict")]
    assert {r.levelname for r in client_errors} == {"INFO"} and len(client_errors) >= len(hostile_corpus(study))
    assert client_errors[0].getMessage() in {"client error on /predict: 415 UnsupportedImage",
                                             "client error on /predict: 400 InvalidArgument"}
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in caplog.records)     # no traceback for a 4xx
    too_big = client.post("/predict", files={"image": ("big.png", b"\x00" * (study.config.serve.max_request_bytes + 1))})
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]

    def chunked():
        yield b"\x00" * study.config.serve.max_request_bytes
        yield b"\x00"
    streamed = client.post("/predict", content=chunked(), headers={"content-type": "application/octet-stream"})
    assert streamed.status_code == 413                                 # no declared length: counted as it streams
    assert client.post("/predict", json={}).status_code == 400         # no image field
    assert_text_is_no_upload(lambda route, **kwargs: client.post(f"/{route}", **kwargs))
    logged = caplog.text + "".join(capfd.readouterr())
    assert "SECRETNAME" not in logged                                  # patient tags never reach the log


def test_the_service_refuses_weights_its_record_was_not_issued_for(client):
    """Weights swapped in the store after import: the service refuses to start (what a `bentoml serve` worker
    runs at start, here in process; the real server is started once below)."""
    from models.record import WeightsMismatch
    from serving.service import CXRClassifier

    weights = Path(CXRClassifier.inner.bento_model.resolve().path_of("model.safetensors"))
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(WeightsMismatch, match="not the ones the privacy record was issued for"):
            CXRClassifier.inner()
    finally:
        weights.write_bytes(original)
    assert CXRClassifier.inner().guarantee["weights_sha256"] == hashlib.sha256(original).hexdigest()


def test_bentoml_serve_answers_over_real_http_with_auth_and_fifty_concurrent_requests(study, tmp_path):
    """The one real server: `bentoml serve` on 127.0.0.1, as `make serve` and the bento run it."""
    image = _test_image(study).read_bytes()
    log = tmp_path / "server.log"
    with running_server(study.root / "params.yaml", log, token=TOKEN) as url:
        def post(route, **kwargs):
            return httpx.post(f"{url}/{route}", timeout=60, **kwargs)

        auth = {"Authorization": f"Bearer {TOKEN}"}
        calls = {"predict": {"files": {"image": ("x.png", image)}},
                 "predict_batch": {"files": [("images", ("x.png", image))]}, "privacy": {"json": {}}}
        for route, kwargs in calls.items():
            assert post(route, **kwargs).status_code == 401, route
            assert post(route, headers={"Authorization": "Bearer wrong"}, **kwargs).status_code == 401, route
            assert post(route, headers=auth, **kwargs).status_code == 200, route
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        privacy = post("privacy", json={}, headers=auth)
        assert privacy.status_code == 200
        assert privacy.json()["privacy"]["epsilon"] == study.version("champion").tags["privacy.epsilon"]
        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(lambda _: post("predict", files={"image": ("x.png", image)}, headers=auth),
                                    range(50)))
        assert [a.status_code for a in answers] == [200] * 50
        first = answers[0].json()["probabilities"]     # batched with different neighbours: equal to float rounding
        assert all(a.json()["probabilities"] == pytest.approx(first, abs=1e-6) for a in answers)
        assert post("predict", files={"image": ("x.png", b"nonsense")}, headers=auth).status_code == 415
        hostile = hostile_corpus(study)
        for name, (payload, status) in hostile.items():
            answer = post("predict", files={"image": ("upload", payload)}, headers=auth)
            assert answer.status_code == status and answer.json()["error"], (name, answer.status_code, answer.text)
        assert_text_is_no_upload(lambda route, **kwargs: post(route, headers=auth, **kwargs))
        after = post("predict", files={"image": ("x.png", image)}, headers=auth).json()
        assert after["probabilities"] == pytest.approx(first, abs=1e-6) and after["privacy"] == privacy.json()["privacy"]

        # Load: 2,000 calls from 32 keep-alive callers, one in 20 hostile; no 5xx, and the memory stays flat.
        uploads = [payload for payload, _ in hostile.values()]
        calls = [uploads[k % len(uploads)] if k % 20 == 0 else image for k in range(2000)]
        statuses, memory = asyncio.run(_load(url, calls, auth, server_processes(url)))
        assert statuses.get(500, 0) == statuses.get(503, 0) == 0 and not any(code >= 500 for code in statuses)
        assert statuses[200] == 1900 and sum(statuses.values()) == 2000
        warm, end = memory
        assert abs(end - warm) <= 0.1 * warm, f"server memory {warm / 2**20:.0f} MiB after warm-up, {end / 2**20:.0f} at the end"
    log_text = log.read_text()
    assert "Traceback" not in log_text and "[ERROR]" not in log_text                 # a 4xx is one INFO line
    assert "client error on /predict: 400 InvalidArgument" in log_text and "SECRETNAME" not in log_text


def server_processes(url: str) -> list:
    """The `bentoml serve` process listening at ``url`` and every process it started."""
    import psutil

    port = url.rsplit(":", 1)[1]
    parent = next(p for p in psutil.process_iter(["cmdline"])
                  if "serve" in (p.info["cmdline"] or []) and port in (p.info["cmdline"] or []))
    return [parent, *parent.children(recursive=True)]


async def _load(url: str, uploads: list[bytes], headers: dict, processes: list) -> tuple[dict[int, int], tuple]:
    """Sends ``uploads`` from 32 keep-alive callers; the status counts, and the servers' total RSS after the first
    quarter (warm-up) and at the end."""
    queue, statuses, memory = list(reversed(uploads)), {}, []
    warm_up = len(uploads) - len(uploads) // 4

    def rss() -> int:
        return sum(p.memory_info().rss for p in processes)

    # Idle connections expire on the client first: the server closes one idle for 5 s (uvicorn's keep-alive
    # timeout), httpx's default expiry is also 5 s, and a request sent on a connection as the server closes it is
    # lost (httpx.ReadError; seen once in CI, when the load ran past 5 s on a busy machine).
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as client:
        async def caller() -> None:
            while queue:
                payload = queue.pop()
                if len(queue) == warm_up:
                    memory.append(rss())
                answer = await client.post("/predict", files={"image": ("upload", payload)})
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1

        await asyncio.gather(*(caller() for _ in range(32)))
    return statuses, (memory[0], rss())

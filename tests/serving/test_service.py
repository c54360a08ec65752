"""The inference API over real HTTP: a tiny grid trained, evaluated and registered, imported into the BentoML store
and served by `bentoml serve` on 127.0.0.1."""

import dataclasses
import io
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from PIL import Image

from models.convnext import predict
from models.preprocessing import load_image
from models.weights import load_model
from pipelines.config import load_params
from pipelines.data.store import open_site
from pipelines.evaluate import evaluate
from pipelines.prepare import prepare
from pipelines.register import register_models
from pipelines.registry import get_version
from pipelines.report import report
from pipelines.train import train
from serving.launch import running_server
from serving.model_store import import_registered
from tests.conftest import tiny

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_data):
    """prepare -> train (scratch at epsilon 8 and inf, half and all the data) -> evaluate -> report -> register on the
    tiny data, then the import into the BentoML store."""
    root = tmp_path_factory.mktemp("served")
    os.symlink(tiny_data, root / "data")
    raw = yaml.safe_load(Path("params.yaml").read_text())
    tiny(raw)
    raw["grid"].update(inits=["scratch"], data_fractions=[0.5, 1.0])   # with a data-scale sweep
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    cwd = Path.cwd()
    os.chdir(root)
    try:
        params = load_params(Path("params.yaml"))
        prepare(params)
        for cell in params.grid_cells():
            train(dataclasses.replace(params, train=cell))
        evaluate(params)
        report(params)
        register_models(params)
        import_registered(params)
    finally:
        os.chdir(cwd)
    return root, params


@pytest.fixture(scope="module")
def server(study):
    log = study[0] / "server.log"
    with running_server(study[0] / "params.yaml", log) as url:
        yield url, log


@pytest.fixture(scope="module")
def auth_server(study):
    with running_server(study[0] / "params.yaml", study[0] / "server-auth.log", token=TOKEN) as url:
        yield url


def test_the_report_shows_the_data_scale_sweep(study):
    folder = study[0] / "artifacts/report"
    assert (folder / "data_fraction_sweep.png").is_file() and not (folder / "model_sweep.png").exists()
    sweep = pd.read_csv(folder / "data_fraction_sweep.csv", index_col=[0, 1])
    assert list(sweep.columns) == ["0.5", "1.0"] and len(sweep) == 2     # (scratch, 8) and (scratch, inf)
    assert "Data scale" in (folder / "report.md").read_text()


def _test_image(study, site="synthetic-uka-cxr-inhouse"):
    root, _ = study
    meta = open_site(root / "artifacts/prepare" / site).metadata
    return root / meta[meta["split"] == "test"]["path"].iloc[0]


def _post(url, route, files=None, **kwargs):
    return httpx.post(f"{url}/{route}", files=files, timeout=60, **kwargs)


def test_predict_equals_the_offline_model_and_carries_the_registry_guarantee(study, server):
    root, params = study
    url, _ = server
    image = _test_image(study)
    answer = _post(url, "predict", files={"image": (image.name, image.read_bytes(), "image/png")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    registered = get_version(params.register.name, "champion")
    model, spec = load_model(root / "artifacts/train" / registered.tags["cell"])
    offline = predict(model, load_image(image, spec.image_size)[None])[0]
    served = np.array([body["probabilities"][label] for label in spec.labels])
    assert np.max(np.abs(served - offline)) < 1e-5
    assert body["privacy"] == {k.removeprefix("privacy."): v for k, v in registered.tags.items()
                               if k.startswith("privacy.")} | {"training_data_version": registered.tags["data_version"]}
    assert float(body["privacy"]["epsilon"]) <= 8.0 + 0.02 and body["privacy"]["unit"] == "image"
    assert body["model"]["version"] == registered.version and body["model"]["alias"] == "champion"
    assert all(body["decisions"][k] == (body["probabilities"][k] >= body["thresholds"][k]) for k in spec.labels)


def test_dicom_and_odd_modes_are_converted(study, server):
    url, _ = server
    dicom = next((study[0] / "data/synthetic-vindr-cxr").rglob("*.dicom"))
    assert _post(url, "predict", files={"image": ("x.dcm", dicom.read_bytes())}).status_code == 200
    gray = Image.open(_test_image(study)).convert("L")
    for mode, fmt in (("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("LA", "PNG")):
        buffer = io.BytesIO()
        (gray.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(gray, np.uint16) * 257)).save(
            buffer, format=fmt)
        answer = _post(url, "predict", files={"image": (f"x.{fmt.lower()}", buffer.getvalue())})
        assert answer.status_code == 200, (mode, answer.text)


def test_batch_answers_each_image(study, server):
    url, _ = server
    image = _test_image(study).read_bytes()
    answer = _post(url, "predict_batch", files=[("images", ("a.png", image)), ("images", ("b.png", b"nonsense")),
                                                ("images", ("c.png", image))])
    assert answer.status_code == 200, answer.text
    first, bad, third = answer.json()
    assert first["probabilities"] == third["probabilities"] and "error" in bad
    assert first["privacy"]["epsilon"] == bad["privacy"]["epsilon"]


def test_privacy_route_equals_the_registry_tags(study, server):
    url, _ = server
    body = _post(url, "privacy", json={}).json()
    tags = get_version(study[1].register.name, "champion").tags
    assert body["privacy"]["epsilon"] == tags["privacy.epsilon"] and body["privacy"]["delta"] == tags["privacy.delta"]
    assert body["privacy"]["accountant"] == tags["privacy.accountant"] == "prv"
    assert body["card"]["test_mean_auroc"] == tags["test_mean_auroc"]
    assert "Opacus' secure RNG mode" in body["card"]["model_card"]
    baseline = get_version(study[1].register.name, "non-private-baseline").tags
    assert baseline["privacy.epsilon"] == "inf" and baseline["privacy.accountant"] == "none"


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares huge dimensions and holds almost nothing (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def _dicom(study, preamble: bytes = b"\x00" * 128, sop_class: str | None = None) -> bytes:
    dicom = next((study[0] / "data/synthetic-vindr-cxr").rglob("*.dicom"))
    ds = pydicom.dcmread(dicom)
    ds.PatientName = "SECRETNAME^PATIENT"
    if sop_class:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.preamble = preamble
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_bad_input_gets_a_4xx_json_error_never_a_500(study, server):
    url, log = server
    png = _test_image(study).read_bytes()
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    cases = {
        "non-image bytes": (b"this is not an image at all", 415),
        "unsupported format (GIF)": (gif.getvalue(), 415),
        "truncated PNG": (png[: len(png) // 2], 400),
        "decompression bomb": (_png_header(20000, 20000), 400),
        "DICOM with a non-zero preamble": (_dicom(study, preamble=b"MZ" + b"\x90" * 126), 400),
        "DICOM that is not an image (SR)": (_dicom(study, sop_class="1.2.840.10008.5.1.4.1.1.88.11"), 400),
    }
    for name, (payload, status) in cases.items():
        answer = _post(url, "predict", files={"image": ("upload", payload)})
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        assert answer.json()["error"], name
    too_big = _post(url, "predict", files={"image": ("big.png", b"\x00" * (study[1].serve.max_request_bytes + 1))})
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    assert _post(url, "predict", json={}).status_code == 400           # no image field
    assert "SECRETNAME" not in log.read_text()                         # patient tags never reach the log


def test_fifty_concurrent_requests_all_succeed(study, server):
    url, _ = server
    image = _test_image(study).read_bytes()
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda _: _post(url, "predict", files={"image": ("x.png", image)}), range(50)))
    assert [a.status_code for a in answers] == [200] * 50
    assert len({a.json()["probabilities"]["cardiomegaly"] for a in answers}) == 1


def test_with_a_token_every_inference_route_needs_it(study, auth_server):
    url = auth_server
    image = _test_image(study).read_bytes()
    calls = {"predict": {"files": {"image": ("x.png", image)}}, "predict_batch": {"files": [("images", ("x.png", image))]},
             "privacy": {"json": {}}}
    for route, kwargs in calls.items():
        assert _post(url, route, **kwargs).status_code == 401, route
        assert _post(url, route, headers={"Authorization": "Bearer wrong"}, **kwargs).status_code == 401, route
        assert _post(url, route, headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs).status_code == 200, route
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200 and httpx.get(f"{url}/healthz").status_code == 200

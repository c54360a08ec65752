"""The DP-CXR inference API: a BentoML service around one registered classifier.

    python -m serving.model_store                                  # registry alias -> BentoML model store
    bentoml serve serving.service:CXRClassifier --host 127.0.0.1 --port 3000

Each worker decodes and checks uploads and holds the model, whose calls merge the images of concurrent requests
(``serving.batching``). Routes (all POST): ``/predict`` (one PNG, JPEG or DICOM upload, field ``image``),
``/predict_batch`` (a list, field ``images``), ``/privacy``; BentoML's ``/healthz``, ``/livez``, ``/readyz`` and
``/metrics`` stay. Every answer carries the model's privacy guarantee. Images are decoded and preprocessed by the
training code (``models.preprocessing``), so probabilities equal the offline model's. Bad input is a 4xx JSON
error; images and DICOM tags are never logged. The configuration is ``params.yaml`` (``serve``, ``register``), or
the file named by ``DP_CXR_PARAMS``.
"""

from __future__ import annotations

import asyncio
import json
import os
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
import torch
from bentoml.exceptions import BentoMLException, InvalidArgument
from bentoml.validators import ContentType

from models.convnext import predict, use_onednn_pointwise
from models.device import resolve_device
from models.preprocessing import ImageDecodeError, decode_bytes, preprocess
from models.record import privacy_statement, verified_record
from models.weights import load_model
from serving.batching import Batcher
from serving.connections import pace_accepts
from serving.model_store import bento_model_name
from serving.security import BearerAuth, BodyLimit, JsonErrors, quiet_client_errors, refuse_url_uploads
from serving.settings import load_serving_config
from serving.uploads import Upload

CONFIG = load_serving_config(Path(os.environ.get("DP_CXR_PARAMS", "params.yaml")))
SETTINGS = CONFIG.serve
# One worker per core, each computing its batches on one thread: on 2 cores two workers served 255-363 images/s at
# concurrency 32 and one with two threads 250-306 (benchmarks/serve.py, four runs each, an earlier version of this
# service); a worker's Python (HTTP, decoding, the model's layer calls) holds one interpreter lock, so one worker left
# a core a third idle. The workers' connections are spread by ``serving.connections``.
WORKERS = os.cpu_count() or 1
REQUEST_SECONDS = 60
# Declared: otherwise BentoML derives every answer's media type from the return type's JSON schema, rebuilding it
# per response (3% of a worker's CPU at concurrency 32).
JSON = ContentType("application/json")
# BentoML's OpenTelemetry middleware builds a span per request even with no exporter configured (its default): 10%
# of a worker's CPU at concurrency 32. Unless tracing is asked for, every URL is excluded from it.
TRACING = {} if SETTINGS.tracing else {"tracing": {"excluded_urls": ["."]}}


class UnsupportedImage(BentoMLException):
    """An upload in a format the API does not open (415)."""

    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


@bentoml.service(traffic={"timeout": REQUEST_SECONDS, "max_concurrency": 256}, workers=WORKERS, **TRACING)
class CXRClassifier:
    """Chest X-ray multi-label classifier trained with differential privacy."""

    bento_model = bentoml.models.BentoModel(f"{bento_model_name(SETTINGS.alias)}:latest")

    def __init__(self) -> None:
        folder = Path(self.bento_model.path)
        # The guarantee travels with the weights: refuse to start on weights the record was not issued for.
        self.guarantee = verified_record(folder)
        self.model, self.spec = load_model(folder)
        use_onednn_pointwise(self.model.to(resolve_device(CONFIG.device)).eval())
        torch.set_num_threads(1)     # the other cores run the other workers
        self.scores = Batcher(self._prepare, lambda images: predict(self.model, images), SETTINGS.max_batch_size)
        tags = self.bento_model.info.metadata["tags"]
        labels = self.bento_model.info.labels
        self.thresholds = json.loads(tags["thresholds"])
        self.identity = {"name": labels["registered_model"], "version": labels["registered_version"],
                         "alias": labels["alias"], "bento_model": str(self.bento_model.tag)}
        self.card = {key: tags[key] for key in ("init", "model_size", "image_size", "test_site", "test_mean_auroc",
                                                "test_mean_auroc_ci95", "threshold_rule", "fairness.sex_spd_auroc",
                                                "fairness.largest_age_spd_auroc", "git_commit", "train_run_id")}
        self.card["model_card"] = Path(self.bento_model.path_of("model_card.md")).read_text()
        # BentoML looks each route's method up on this instance per request, and that lookup rebuilds the method's
        # signature with ``inspect`` every time (8% of a worker's CPU at concurrency 32): bind each once.
        for name in CXRClassifier.apis:
            setattr(self, name, getattr(self, name))

    @bentoml.api
    async def predict(self, image: Upload) -> Annotated[dict, JSON]:
        """One image -> per-label probability, decision at the stored threshold, model and privacy guarantee.

        Concurrent calls share the model's batches; each upload is decoded and checked on its own (a bad one is its
        own 4xx).
        """
        return self._answer(await self.scores(image))

    @bentoml.api
    async def predict_batch(self, images: list[Upload]) -> Annotated[list[dict], JSON]:
        """A list of images -> one answer each; an unusable image gets an ``error`` entry, the others their answer."""
        scores = await asyncio.gather(*(self.scores(upload) for upload in images), return_exceptions=True)
        answers = []
        for result in scores:
            if isinstance(result, (InvalidArgument, UnsupportedImage)):
                answers.append({"error": str(result), "model": self.identity, "privacy": self.guarantee})
            elif isinstance(result, BaseException):
                raise result
            else:
                answers.append(self._answer(result))
        return answers

    @bentoml.api
    def privacy(self) -> Annotated[dict, JSON]:
        """The model's privacy guarantee and model card fields."""
        return {"model": self.identity, "privacy": self.guarantee, "statement": privacy_statement(self.guarantee),
                "card": self.card}

    def _prepare(self, upload: Upload) -> np.ndarray:
        try:
            gray = decode_bytes(upload.data, untrusted=True)
        except ImageDecodeError as error:
            if str(error).startswith(("unsupported", "not a PNG")):
                raise UnsupportedImage(str(error)) from None
            raise InvalidArgument(str(error)) from None
        if min(gray.shape) < SETTINGS.min_image_side:
            raise InvalidArgument(f"image of {gray.shape[1]}x{gray.shape[0]} pixels is below the minimum side of "
                                  f"{SETTINGS.min_image_side} px (serve.min_image_side): send the radiograph as "
                                  f"acquired")
        return preprocess(gray, self.spec.image_size)

    def _answer(self, scores: np.ndarray) -> dict:
        probabilities = {label: float(p) for label, p in zip(self.spec.labels, scores, strict=True)}
        return {"probabilities": probabilities,
                "decisions": {label: p >= self.thresholds[label] for label, p in probabilities.items()},
                "thresholds": self.thresholds, "model": self.identity, "privacy": self.guarantee}


CXRClassifier.add_asgi_middleware(JsonErrors)
CXRClassifier.add_asgi_middleware(BodyLimit, max_bytes=SETTINGS.max_request_bytes)
CXRClassifier.add_asgi_middleware(BearerAuth, token_env=SETTINGS.token_env)
quiet_client_errors()
refuse_url_uploads()
pace_accepts(WORKERS)

"""The MLflow "models from code" definition of a DP-CXR classifier.

MLflow stores this file with the model and executes it on load (no pickle); ``load_context`` rebuilds the
ConvNeXt from the ``weights`` (safetensors) and ``spec`` (JSON) artifacts. The input is a batch of images
already preprocessed by ``models.preprocessing`` (uint8, N x S x S); the output is per-label probabilities.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class CXRClassifier(PythonModel):
    """A safetensors ConvNeXt chest X-ray classifier as an MLflow pyfunc."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Loads the weights and spec that were logged as artifacts."""
        from models.weights import load_model

        self.model, self.spec = load_model(Path(context.artifacts["weights"]).parent)
        self.model.eval()

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray,
                params: dict | None = None) -> np.ndarray:
        """Probabilities (N, L) in ``spec.labels`` order for uint8 images (N, S, S)."""
        from models.convnext import predict

        images = np.asarray(model_input)
        side = self.spec.image_size
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (side, side):
            raise ValueError(f"expected preprocessed uint8 images of shape (N, {side}, {side}), "
                             f"got {images.dtype} {images.shape}: run models.preprocessing.preprocess first")
        return predict(self.model, images)


mlflow.models.set_model(CXRClassifier())

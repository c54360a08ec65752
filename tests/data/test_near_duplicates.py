"""The near-duplicate signature: re-encoded and intensity-changed copies are found, distinct images are not."""

import io

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import decode_bytes, decode_file
from pipelines.data.source import near_duplicates, signature

COPIES = {
    "jpeg q90": lambda a: a,
    "jpeg q90, gamma 1.15": lambda a: 255 * (a / 255) ** 1.15,
    "jpeg q90, contrast 0.9": lambda a: a * 0.9 + 10,
    "jpeg q90, brightness +15": lambda a: a + 15,
}


@pytest.fixture(scope="module")
def originals(private_store):
    """Twelve private images of twelve different patients, decoded."""
    import pandas as pd

    meta = pd.read_csv(private_store / "artifacts/prepare" / "synthetic-uka-cxr-inhouse" / "metadata.csv")
    first = meta.drop_duplicates("patient_id").head(12)
    return [decode_file(private_store / path) for path in first["path"]]


def _copy(gray: np.ndarray, change) -> np.ndarray:
    encoded = io.BytesIO()
    Image.fromarray(np.clip(np.round(change(gray * 255)), 0, 255).astype(np.uint8)).save(encoded, "JPEG", quality=90)
    return decode_bytes(encoded.getvalue())


@pytest.mark.parametrize("change", COPIES.values(), ids=COPIES.keys())
def test_every_altered_copy_is_a_near_duplicate_of_its_original(originals, change):
    copies = np.stack([signature(_copy(gray, change)) for gray in originals])
    assert near_duplicates(copies, np.stack([signature(gray) for gray in originals])) == len(originals)
    # Each copy matches its own original, not merely some image.
    assert all(near_duplicates(copies[[k]], np.stack([signature(originals[k])])) == 1 for k in range(len(originals)))


def test_images_of_other_patients_are_not_near_duplicates(originals):
    signatures = np.stack([signature(gray) for gray in originals])
    assert near_duplicates(signatures[:6], signatures[6:]) == 0
    assert near_duplicates(signatures[:6], signatures[:0]) == 0


def test_the_signature_ignores_the_training_image_size(originals):
    """Computed at its own fixed size: the same file gives the same signature whatever base.image_size is."""
    gray = originals[0]
    resized = np.asarray(Image.fromarray(gray, mode="F").resize((200, 200), Image.Resampling.BILINEAR))
    assert signature(gray).shape == (32 * 32,) and signature(gray).dtype == np.uint8
    assert near_duplicates(signature(resized)[None], signature(gray)[None]) == 1

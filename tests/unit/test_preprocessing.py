"""Decoding and the study's preprocessing: formats, modes, MONOCHROME1, bad files, equalisation."""

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from models.preprocessing import ImageDecodeError, decode_bytes, decode_file, equalize_histogram, preprocess


def gradient(height=40, width=30) -> np.ndarray:
    return np.add.outer(np.arange(height), np.arange(width)).astype(np.float64) / (height + width - 2)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def dicom_bytes(stored: np.ndarray, photometric: str, bits: int = 12) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.3"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, "1.2.3"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, bits, bits - 1, 0
    ds.PhotometricInterpretation = photometric
    ds.PixelData = stored.astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_monochrome1_is_inverted_to_look_like_monochrome2():
    stored = np.round(gradient() * 4095).astype(np.uint16)
    as_m2 = decode_bytes(dicom_bytes(stored, "MONOCHROME2"))
    as_m1 = decode_bytes(dicom_bytes(4095 - stored, "MONOCHROME1"))
    assert np.allclose(as_m1, as_m2, atol=1e-6)
    assert as_m2[0, 0] == 0.0 and as_m2[-1, -1] == 1.0


def test_sixteen_bit_png_keeps_its_depth():
    values = np.random.default_rng(0).integers(0, 65536, size=(40, 30)).astype(np.uint16)
    decoded = decode_bytes(encode(Image.fromarray(values), "PNG"))
    assert decoded.dtype == np.float32
    assert np.allclose(decoded, values / 65535.0, atol=1e-6)
    assert len(np.unique(decoded)) > 256          # not squeezed through 8 bits


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "CMYK", "LA"])
def test_colour_modes_become_grayscale(mode):
    gray = Image.fromarray(np.round(gradient() * 255).astype(np.uint8), mode="L")
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = decode_bytes(encode(gray.convert(mode), fmt))
    assert decoded.ndim == 2 and decoded.shape == (40, 30)
    assert np.abs(decoded - np.asarray(gray) / 255.0).max() < 0.06


def test_bad_files_raise_a_clear_error(tmp_path):
    jpeg = encode(Image.fromarray(np.round(gradient(200, 200) * 255).astype(np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt JPEG"):
        decode_bytes(jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageDecodeError, match="not a PNG, JPEG or DICOM"):
        decode_bytes(b"this is a text file, not an image")
    with pytest.raises(ImageDecodeError, match="unsupported image format GIF"):
        decode_bytes(encode(Image.new("L", (8, 8)), "GIF"))
    with pytest.raises(ImageDecodeError, match="not a readable DICOM"):
        decode_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    with pytest.raises(ImageDecodeError, match="cannot read"):
        decode_file(tmp_path / "missing.png")


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")   # tiny file, 100 megapixels
    assert len(bomb) < 100_000
    with pytest.raises(ImageDecodeError, match="exceeds the 50000000 pixel limit"):
        decode_bytes(bomb)


def test_equalisation_matches_the_opencv_definition():
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(100, 20, size=(64, 64)), 0, 255).astype(np.uint8)
    equalised = equalize_histogram(image)
    # OpenCV: lut[v] = round((cdf[v] - cdf_min) * 255 / (N - cdf_min)).
    cdf = np.cumsum(np.bincount(image.ravel(), minlength=256))
    cdf_min = cdf[image.min()]
    expected = np.round((cdf[image] - cdf_min) * 255.0 / (image.size - cdf_min)).astype(np.uint8)
    assert np.array_equal(equalised, expected)
    assert equalised.min() == 0 and equalised.max() == 255
    # Monotone: the order of grey levels is kept.
    order = np.argsort(image.ravel(), kind="stable")
    assert np.all(np.diff(equalised.ravel()[order].astype(int)) >= 0)
    assert np.array_equal(equalize_histogram(np.full((4, 4), 7, np.uint8)), np.full((4, 4), 7, np.uint8))


def test_preprocess_gives_a_square_uint8_image_whatever_the_input():
    out = preprocess(gradient(120, 90) * 1000 + 50, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert np.array_equal(preprocess(np.zeros((10, 10)), 16), np.zeros((16, 16), np.uint8))

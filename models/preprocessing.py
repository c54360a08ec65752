"""Image decoding and preprocessing shared by the prepare stage, training and serving.

The study's recipe: read DICOM, PNG (8 or 16 bit) or JPEG as grayscale, invert MONOCHROME1, min-max normalise,
resize to a square, convert to uint8, histogram-equalise. Everything here depends only on the one image it is
given: no constant is ever estimated from (private) data.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

# Decompression-bomb guard: far above any radiograph (real ones are about 3000 x 3000).
MAX_PIXELS = 50_000_000
DICOM_SUFFIXES = (".dcm", ".dicom")
ALLOWED_FORMATS = ("PNG", "JPEG")


class ImageDecodeError(ValueError):
    """An image file that cannot be used: unreadable, truncated, unsupported or implausible."""


def decode_file(path: Path) -> np.ndarray:
    """Decodes an image file to a grayscale float32 array in [0, 1] (before normalisation).

    Args:
        path: a PNG, JPEG or DICOM file.

    Raises:
        ImageDecodeError: the file cannot be decoded; the message says why.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageDecodeError(f"cannot read {path}: {error.strerror}") from error
    return decode_bytes(data, is_dicom=Path(path).suffix.lower() in DICOM_SUFFIXES)


def decode_bytes(data: bytes, is_dicom: bool | None = None) -> np.ndarray:
    """Decodes image bytes (PNG, JPEG or DICOM) to a grayscale float32 array in [0, 1].

    Args:
        data: the file's bytes.
        is_dicom: whether the bytes are DICOM; None sniffs the ``DICM`` magic at offset 128.

    Raises:
        ImageDecodeError: the bytes cannot be decoded; the message says why.
    """
    if is_dicom is None:
        is_dicom = data[128:132] == b"DICM"
    return _decode_dicom(data) if is_dicom else _decode_raster(data)


def _decode_raster(data: bytes) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise ImageDecodeError("not a PNG, JPEG or DICOM image") from error
    if image.format not in ALLOWED_FORMATS:
        raise ImageDecodeError(f"unsupported image format {image.format}; use PNG, JPEG or DICOM")
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the {MAX_PIXELS} pixel limit")
    try:
        image.load()
    except (OSError, SyntaxError) as error:
        raise ImageDecodeError(f"truncated or corrupt {image.format} image: {error}") from error
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (PadChest): full range is 0..65535.
        return (np.asarray(image, dtype=np.float64) / 65535.0).astype(np.float32)
    if image.mode != "L":
        image = image.convert("L")   # RGB, RGBA, palette, CMYK: luminance of the displayed picture
    return np.asarray(image, dtype=np.float32) / 255.0


def _decode_dicom(data: bytes) -> np.ndarray:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError) as error:
        raise ImageDecodeError(f"not a readable DICOM image: {error}") from error
    if rows * columns > MAX_PIXELS:
        raise ImageDecodeError(f"DICOM of {columns}x{rows} pixels exceeds the {MAX_PIXELS} pixel limit")
    try:
        pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    except Exception as error:  # pydicom raises many types for broken or compressed pixel data
        raise ImageDecodeError(f"cannot decode DICOM pixel data: {error}") from error
    if pixels.ndim != 2:
        raise ImageDecodeError(f"DICOM pixel data has shape {pixels.shape}; a single grayscale frame is needed")
    bits = int(ds.get("BitsStored", 16))
    top = float(2**bits - 1)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        pixels = top - pixels          # MONOCHROME1 shows high values dark: invert to the usual look
    return (np.clip(pixels, 0, top) / top).astype(np.float32)


def equalize_histogram(image: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a uint8 image, as OpenCV's ``equalizeHist`` does it.

    Args:
        image: uint8 array.

    Returns:
        The equalised uint8 array (a constant image stays as it is).
    """
    histogram = np.bincount(image.ravel(), minlength=256)
    cdf = np.cumsum(histogram)
    total, cdf_min = cdf[-1], cdf[np.flatnonzero(histogram)[0]]
    if total == cdf_min:
        return image.copy()
    lut = np.clip(np.round((cdf - cdf_min) * 255.0 / (total - cdf_min)), 0, 255).astype(np.uint8)
    return lut[image]


def preprocess(gray: np.ndarray, size: int) -> np.ndarray:
    """The study's preprocessing of one decoded image: min-max, square resize, uint8, histogram equalisation.

    Args:
        gray: 2-D float array (any range).
        size: output side in pixels.

    Returns:
        A ``(size, size)`` uint8 array.
    """
    low, high = float(gray.min()), float(gray.max())
    scaled = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    resized = Image.fromarray(scaled.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    as_uint8 = np.clip(np.round(np.asarray(resized) * 255.0), 0, 255).astype(np.uint8)
    return equalize_histogram(as_uint8)


def load_image(path: Path, size: int) -> np.ndarray:
    """Decodes and preprocesses one file: what the image store holds for it.

    Raises:
        ImageDecodeError: the file cannot be decoded.
    """
    return preprocess(decode_file(path), size)

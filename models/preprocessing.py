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
# Formats Pillow could open but this project never does (only PNG, JPEG and DICOM): named in the error.
OTHER_FORMATS = {b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"RIFF": "WebP",
                 b"SIMPLE": "FITS", b"\x00\x00\x00\x0cjP": "JPEG 2000", b"%PDF": "PDF"}
# Modes converted to grayscale explicitly (the luminance of what a viewer displays); anything else is refused.
CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})
# DICOM storage classes of radiographs: CR, DX (for presentation / processing), secondary capture.
RADIOGRAPH_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4"})


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


def decode_bytes(data: bytes, is_dicom: bool | None = None, untrusted: bool = False) -> np.ndarray:
    """Decodes image bytes (PNG, JPEG or DICOM) to a grayscale float32 array in [0, 1].

    Args:
        data: the file's bytes.
        is_dicom: whether the bytes are DICOM; None sniffs the ``DICM`` magic at offset 128.
        untrusted: bytes from outside (the inference API): DICOM must also have an all-zero preamble (PS3.10
            7.5: it can carry executable content) and a radiograph storage class.

    Raises:
        ImageDecodeError: the bytes cannot be decoded; the message says why.
    """
    if is_dicom is None:
        is_dicom = data[128:132] == b"DICM"
    return _decode_dicom(data, untrusted) if is_dicom else _decode_raster(data)


def _decode_raster(data: bytes) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)   # never lets Pillow try other decoders
    except Image.DecompressionBombError as error:   # Pillow's own cap, far above ours, fires while opening
        raise ImageDecodeError(f"image exceeds the {MAX_PIXELS} pixel limit: {error}") from error
    except UnidentifiedImageError as error:
        other = next((name for magic, name in OTHER_FORMATS.items() if data.startswith(magic)), None)
        if other:
            raise ImageDecodeError(f"unsupported image format {other}; use PNG, JPEG or DICOM") from error
        raise ImageDecodeError("not a PNG, JPEG or DICOM image") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:   # a header cut short (JPEG: "Truncated File Read")
        raise ImageDecodeError(f"truncated or corrupt image header: {error}") from error
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the {MAX_PIXELS} pixel limit")
    try:
        image.load()
    except (OSError, SyntaxError) as error:
        raise ImageDecodeError(f"truncated or corrupt {image.format} image: {error}") from error
    if image.mode in SIXTEEN_BIT_MODES:
        # 16-bit grayscale (PadChest): full range is 0..65535.
        return (np.asarray(image, dtype=np.float64) / 65535.0).astype(np.float32)
    if image.mode not in CONVERTIBLE_MODES:
        raise ImageDecodeError(f"unsupported {image.format} pixel mode {image.mode}; use 8/16-bit grayscale or RGB")
    if image.mode != "L":
        image = image.convert("L")   # RGB(A), palette, CMYK, bilevel: luminance of the displayed picture
    return np.asarray(image, dtype=np.float32) / 255.0


def _decode_dicom(data: bytes, untrusted: bool = False) -> np.ndarray:
    if untrusted and data[:128].strip(b"\x00"):
        raise ImageDecodeError("DICOM preamble is not all zeros (it can hide executable content); "
                               "re-export the file without a preamble")
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        sop_class = str(ds.get("SOPClassUID", "missing"))
        rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError) as error:
        raise ImageDecodeError(f"not a readable DICOM image: {error}") from error
    if untrusted and sop_class not in RADIOGRAPH_SOP_CLASSES:
        raise ImageDecodeError(f"DICOM SOP class {sop_class} is not a radiograph (CR, DX or secondary capture)")
    if not rows or not columns:
        raise ImageDecodeError("not a readable DICOM image: it has no image dimensions (Rows, Columns)")
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

"""Generates the embedded synthetic multi-site chest X-ray data set under ``data/``.

Run as ``python -m pipelines.data.synthetic --out data``. Every site is written in the native format of the
real data set it mirrors; the same seed and scale give byte-identical files whatever the number of workers,
because each image draws from its own generator seeded by (seed, site, image).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from pipelines.atomic import atomic_folder
from pipelines.data.synthetic.cohort import FINDINGS, SITES, SiteSpec, sample_cohort
from pipelines.data.synthetic.native import WRITERS, ImageFile
from pipelines.data.synthetic.render import Acquisition, Subject, findings_for, render

DIGITAL_XRAY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
README = """# SYNTHETIC chest X-ray data (DP-CXR embedded default)

Every image and every record here is synthetic, made by `python -m pipelines.data.synthetic`
(seed {seed}, scale {scale}). No real patient is depicted or described. Each folder mirrors the native
file layout of a public data set so that the real adapters read it:

{sites}
"""


@dataclass(frozen=True)
class RenderTask:
    """One image to render and write: everything a worker process needs."""

    path: Path
    file: ImageFile
    subject: Subject
    acquisition: Acquisition
    seed: tuple[int, int, int]
    findings_seed: tuple[int, int, int, int]
    labels: dict[str, int]


def generate(out: Path, seed: int = 0, scale: float = 1.0, workers: int = 2,
             sites: tuple[SiteSpec, ...] = SITES, public_scale: float = 1.0) -> int:
    """Writes every site under ``out``, replacing what was there only once everything is written.

    Args:
        out: the data root (``data/``).
        seed: the data set's seed.
        scale: multiplies each site's number of patients.
        workers: rendering processes.
        sites: the sites to write.
        public_scale: multiplies the public source's patients on top of ``scale`` (unlabeled public images are
            cheap, and self-supervised pretraining gains from more of them).

    Returns:
        The number of images written.
    """
    with atomic_folder(out) as partial:
        tasks = write_metadata(partial, seed, scale, sites, public_scale)
        started = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in tqdm(pool.imap_unordered(render_one, tasks, chunksize=16), total=len(tasks),
                          desc="render", unit="img", file=sys.stderr, mininterval=1.0):
                pass
        elapsed = time.perf_counter() - started
    print(f"generated {len(tasks)} synthetic images in {elapsed:.1f} s ({len(tasks) / elapsed:.0f} images/s)",
          file=sys.stderr)
    return len(tasks)


def write_metadata(partial: Path, seed: int, scale: float, sites: tuple[SiteSpec, ...],
                   public_scale: float = 1.0) -> list[RenderTask]:
    """Samples every site's cohort, writes its native metadata files and lists the images to render.

    Args:
        partial: the folder to write into.
        seed: the data set's seed.
        scale: multiplies each site's number of patients.
        sites: the sites to write.
        public_scale: multiplies the public source's patients on top of ``scale``.

    Returns:
        One task per image; each renders alone (``render_one``), whatever else is rendered.
    """
    tasks: list[RenderTask] = []
    for site_index, spec in enumerate(sites):
        rng = np.random.default_rng([seed, site_index])
        cohort = sample_cohort(spec, scale * (public_scale if spec.role == "public" else 1.0), rng)
        files = WRITERS[spec.format](cohort, partial / spec.name, rng)
        for index, (file, row) in enumerate(zip(files, cohort.to_dict("records"), strict=True)):
            labels = {k: int(row[f"true_{k}"]) for k in FINDINGS}
            tasks.append(RenderTask(partial / spec.name / file.path, file,
                                    Subject(row["sex"], row["age"], row["view"], {}), spec.acquisition,
                                    (seed, site_index, index), (seed, site_index, index, 1), labels))
    (partial / "README.md").write_text(README.format(
        seed=seed, scale=scale, sites="\n".join(f"- `{s.name}`: {s.role} site, {s.format} layout" for s in sites)))
    return tasks


def render_one(task: RenderTask) -> None:
    """Renders one image from its own seeds and writes it in its site's encoding."""
    findings = findings_for(task.labels, np.random.default_rng(task.findings_seed))
    subject = Subject(task.subject.sex, task.subject.age, task.subject.view, findings)
    pixels = render(subject, task.acquisition, np.random.default_rng(task.seed))
    task.path.parent.mkdir(parents=True, exist_ok=True)
    write_image(task.path, pixels, task.file)


def write_image(path: Path, pixels: np.ndarray, file: ImageFile) -> None:
    """Encodes a [0, 1] image the way the site's real files are stored.

    Args:
        path: destination.
        pixels: float image in [0, 1].
        file: the encoding and, for DICOM, the header fields.
    """
    if file.encoding in ("jpeg", "png8"):
        image = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG" if file.encoding == "jpeg" else "PNG", quality=95)
        path.write_bytes(buffer.getvalue())
    elif file.encoding == "png16":
        Image.fromarray(np.round(pixels * 65535).astype(np.uint16)).save(path, format="PNG")
    elif file.encoding == "dicom":
        _write_dicom(path, pixels, file.dicom)
    else:
        raise ValueError(f"unknown encoding {file.encoding!r}")


def _write_dicom(path: Path, pixels: np.ndarray, tags: dict[str, str]) -> None:
    stored = np.round(pixels * 4095).astype(np.uint16)
    if tags["PhotometricInterpretation"] == "MONOCHROME1":
        stored = 4095 - stored              # MONOCHROME1: high values are dark
    uid = generate_uid(entropy_srcs=[tags["SOPInstanceUID"]])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_XRAY_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DIGITAL_XRAY_FOR_PRESENTATION
    ds.SOPInstanceUID = uid
    ds.Modality = "DX"
    ds.PatientName = "SYNTHETIC^VINDR"
    ds.PatientSex = tags["PatientSex"]
    if tags["PatientAge"]:
        ds.PatientAge = tags["PatientAge"]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = tags["PhotometricInterpretation"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.data.synthetic [--out data] [--seed 0] [--scale 1] [--public-scale 1] [--workers 2]``."""
    parser = argparse.ArgumentParser(description="Generate the synthetic multi-site chest X-ray data set.")
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of patients per site")
    parser.add_argument("--public-scale", type=float, default=1.0,
                        help="multiplies the public source's patients on top of --scale")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.public_scale <= 0:
        parser.error("--scale and --public-scale must be positive")
    generate(args.out, seed=args.seed, scale=args.scale, workers=args.workers, public_scale=args.public_scale)

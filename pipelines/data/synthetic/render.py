"""Renders one synthetic chest radiograph: anatomy, findings, then the site's acquisition signature.

The picture is built as an attenuation map on a grid in body coordinates (x to the image's right, y down,
both about [-1, 1] over the thorax): bright means dense. A PA view shows the patient's right on the image's
left, so the heart sits right of centre. Everything random comes from the generator passed in, so the same
seed gives the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from pipelines.data.schema import LABELS


@dataclass(frozen=True)
class Acquisition:
    """How a site's scanners turn attenuation into pixels.

    Attributes:
        size: output (height, width) in pixels.
        fov: field of view, in body units across the image (larger shows more of the body).
        gamma: exponent of the contrast curve.
        noise: standard deviation of additive noise, in output units [0, 1].
        blur: Gaussian blur in pixels.
        marker: burned-in side marker: ``L``, ``R`` or empty.
        brightness: offset added before the contrast curve.
    """

    size: tuple[int, int]
    fov: float
    gamma: float
    noise: float
    blur: float
    marker: str
    brightness: float = 0.0


@dataclass(frozen=True)
class Subject:
    """What the image shows: the person, the view and the (true) findings with their severities in [0, 1]."""

    sex: str
    age: float
    view: str
    findings: dict[str, float]


def render(subject: Subject, acquisition: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Renders one radiograph.

    Args:
        subject: anatomy and findings.
        acquisition: the site's signature.
        rng: the image's own random generator.

    Returns:
        A float64 array of shape ``acquisition.size`` with values in [0, 1].
    """
    height, width = acquisition.size
    # Patient positioning varies a little from image to image.
    shift_x, shift_y = rng.normal(0, 0.04, size=2)
    angle = rng.normal(0, 0.03)
    scale = acquisition.fov / 2
    ys, xs = np.meshgrid(np.linspace(-scale * height / width, scale * height / width, height),
                         np.linspace(-scale, scale, width), indexing="ij")
    x = np.cos(angle) * xs - np.sin(angle) * ys + shift_x
    y = np.sin(angle) * xs + np.cos(angle) * ys + shift_y - 0.05
    if subject.view == "LATERAL":
        density = _lateral(x, y, subject, rng)
    else:
        density = _frontal(x, y, subject, rng)
    return _acquire(density, acquisition, rng)


def _inside(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, edge: float = 0.04,
            power: float = 2.0) -> np.ndarray:
    """A soft-edged (super)ellipse: about 1 inside, 0 outside."""
    if power == 2.0:
        radius = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    else:
        radius = (np.abs((x - cx) / rx) ** power + np.abs((y - cy) / ry) ** power) ** (1 / power)
    return _sigmoid((1 - radius) / edge)


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(t, -30, 30)))


def _band(distance: np.ndarray, half_width: float) -> np.ndarray:
    return np.exp(-0.5 * (distance / half_width) ** 2)


def _frontal(x: np.ndarray, y: np.ndarray, s: Subject, rng: np.random.Generator) -> np.ndarray:
    female = s.sex == "F"
    child = s.age < 16
    aging = np.clip((s.age - 40) / 50, 0, 1)
    body_w = (0.78 if female else 0.9) * (0.85 if child else 1.0) * rng.uniform(0.95, 1.08)
    ap = s.view == "AP"

    body = _inside(x, y, 0, 0.15, body_w, 1.25, edge=0.05)
    density = 0.42 * body
    # Shoulders and arms at the top corners.
    for side in (-1, 1):
        density += 0.12 * _inside(x, y, side * body_w * 1.0, -0.8, 0.3, 0.18, edge=0.1)

    # Lungs: two soft ellipses cut below by the diaphragm domes.
    lung_w, lung_h, lung_cy = 0.34 * body_w / 0.9, 0.62, -0.12
    lungs = np.zeros_like(x)
    dome = {}
    effusion = s.findings.get("pleural_effusion", 0.0)
    effusion_sides = (-1, 1) if rng.random() < 0.4 else ((-1,) if rng.random() < 0.5 else (1,))
    for side in (-1, 1):
        cx = side * (0.42 * body_w / 0.9)
        dome_height = 0.40 + side * 0.03 + rng.normal(0, 0.02)   # the right dome sits a little higher
        dome[side] = dome_height - 0.13 * np.clip(1 - ((x - cx) / lung_w) ** 2, 0, 1)
        lung = _inside(x, y, cx, lung_cy, lung_w, lung_h, edge=0.05, power=2.4)
        lung *= _sigmoid((dome[side] - y) / 0.02)
        lungs += lung
        if effusion > 0 and side in effusion_sides:
            # Fluid fills the costophrenic angle with a meniscus rising towards the chest wall.
            lateral = np.clip(side * (x - cx) / lung_w, -1, 1)
            level = dome[side] - (0.08 + 0.22 * effusion) * (0.5 + 0.5 * lateral)
            fluid = _sigmoid((y - level) / 0.03)
            density += 0.2 * (0.6 + effusion) * fluid * _inside(x, y, cx, lung_cy, lung_w * 1.1, lung_h * 1.05)
    density -= 0.3 * lungs

    # Abdomen under the domes is soft tissue all the way down.
    below = np.minimum(y - dome[-1], y - dome[1])
    density += 0.08 * body * _sigmoid(below / 0.03)

    # Mediastinum and spine.
    density += 0.12 * _inside(x, y, 0.02, -0.35, 0.11, 0.5, edge=0.08)
    bone = (0.22 if not child else 0.15) * (1 - 0.45 * aging) * (0.9 if female else 1.0)
    density += bone * 0.8 * body * _band(x, 0.06) * (y > -1.0)

    # Heart: widens with cardiomegaly, looks bigger on AP (magnification).
    cardio = s.findings.get("cardiomegaly", 0.0)
    heart_w = (0.25 + 0.02 * aging) * (1 + 0.4 * cardio) * (1.1 if ap else 1.0) * body_w / 0.9
    density += 0.22 * _inside(x, y, 0.08 + 0.4 * (heart_w - 0.25), 0.2, heart_w, 0.22 + 0.05 * cardio, edge=0.07)

    # Ribs: evenly spaced posterior arcs; the distance to the nearest arc is periodic in y.
    spacing = rng.uniform(0.105, 0.125)
    arc = 0.35 * (np.abs(x) - 0.15) ** 2 - 0.1 * np.abs(x)
    offset = np.mod(y - arc + 0.62 + spacing / 2, spacing) - spacing / 2
    rib_zone = (np.abs(x) > 0.06) * _inside(np.abs(x), y, 0.4 * body_w / 0.9, -0.1, body_w * 0.55, 0.75)
    density += bone * 0.55 * _band(offset, 0.02) * rib_zone * (y > -0.68) * (y < 0.45)
    # Clavicles.
    for side in (-1, 1):
        line = -0.66 - 0.15 * (side * x - 0.1)
        density += bone * 0.9 * _band(y - line, 0.025) * ((side * x > 0.05) & (side * x < 0.6))
    if female and not child:
        for side in (-1, 1):
            density += 0.07 * _inside(x, y, side * 0.42, 0.42, 0.27, 0.2, edge=0.1)

    _findings_in_lungs(density, x, y, lungs, s, body_w, rng)
    return density


def _findings_in_lungs(density: np.ndarray, x: np.ndarray, y: np.ndarray, lungs: np.ndarray, s: Subject,
                       body_w: float, rng: np.random.Generator) -> None:
    pneumonia = s.findings.get("pneumonia", 0.0)
    if pneumonia > 0:
        # Patchy consolidation: a cluster of soft blobs in one lower or middle zone.
        side = rng.choice((-1, 1))
        cx, cy = side * rng.uniform(0.25, 0.5) * body_w / 0.9, rng.uniform(-0.1, 0.3)
        patch = np.zeros_like(x)
        for _ in range(rng.integers(4, 9)):
            bx, by = cx + rng.normal(0, 0.08), cy + rng.normal(0, 0.08)
            r = rng.uniform(0.04, 0.09)
            patch += rng.uniform(0.5, 1.0) * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * r * r))
        density += 0.22 * (0.5 + pneumonia) * np.clip(patch, 0, 1.3) * lungs
    atelectasis = s.findings.get("atelectasis", 0.0)
    if atelectasis > 0:
        side = rng.choice((-1, 1))
        cx, cy = side * rng.uniform(0.25, 0.45) * body_w / 0.9, rng.uniform(0.1, 0.3)
        if rng.random() < 0.5:
            # Plate-like (linear) atelectasis: a thin, slightly tilted band.
            tilt = rng.normal(0, 0.25)
            line = _band((y - cy) - tilt * (x - cx), 0.018) * _inside(x, y, cx, cy, 0.2, 0.2)
            density += 0.3 * (0.5 + atelectasis) * line * lungs
        else:
            # Wedge opacity pointing towards the hilum.
            t = np.clip(side * (x - cx) / 0.25 + 0.5, 0, 1)
            wedge = _inside(x, y, cx, cy, 0.2, 0.03 + 0.08 * t, edge=0.15)
            density += 0.16 * (0.5 + atelectasis) * wedge * lungs


def _lateral(x: np.ndarray, y: np.ndarray, s: Subject, rng: np.random.Generator) -> np.ndarray:
    depth = (0.7 if s.sex == "F" else 0.78) * rng.uniform(0.95, 1.05)
    body = _inside(x, y, 0, 0.15, depth, 1.25, edge=0.05)
    density = 0.5 * body
    lung = _inside(x, y, 0.02, -0.1, depth * 0.75, 0.6, edge=0.06)
    lung *= _sigmoid((0.38 - 0.1 * x - y) / 0.02)
    density -= 0.3 * lung
    density += 0.22 * _band(x - depth * 0.75, 0.06) * body                # spine, posterior
    heart = 1 + 0.4 * s.findings.get("cardiomegaly", 0.0)
    density += 0.25 * _inside(x, y, -0.25 * heart, 0.18, 0.3 * heart, 0.22, edge=0.06)
    if s.findings.get("pleural_effusion", 0.0) > 0:
        density += 0.2 * lung * (y > 0.25 - 0.15 * s.findings["pleural_effusion"])
    return density


def _acquire(density: np.ndarray, a: Acquisition, rng: np.random.Generator) -> np.ndarray:
    image = np.clip(density + 0.08 + a.brightness, 0, None)
    image = np.clip(image / 0.95, 0, 1) ** a.gamma
    if a.blur > 0:
        image = gaussian_filter(image, a.blur)
    image = image + rng.normal(0, a.noise, size=image.shape)
    if a.marker:
        _burn_in_marker(image, a.marker)
    return np.clip(image, 0, 1)


def _burn_in_marker(image: np.ndarray, letter: str) -> None:
    """Burns a bright side marker (a block letter L or R) into the top-left corner."""
    height, width = image.shape
    unit = max(2, min(height, width) // 48)
    top, left = 3 * unit, 3 * unit
    image[top:top + 5 * unit, left:left + unit] = 1.0
    if letter == "L":
        image[top + 4 * unit:top + 5 * unit, left:left + 3 * unit] = 1.0
    else:
        image[top:top + unit, left:left + 3 * unit] = 1.0
        image[top + 2 * unit:top + 3 * unit, left:left + 3 * unit] = 1.0
        image[top:top + 3 * unit, left + 2 * unit:left + 3 * unit] = 1.0
        for row in range(2 * unit):
            image[top + 3 * unit + row, left + unit + row // 2:left + 2 * unit + row // 2] = 1.0


def findings_for(labels: dict[str, int], rng: np.random.Generator) -> dict[str, float]:
    """Severities of the true findings: each positive label gets a random strength, some of them faint."""
    return {label: float(rng.beta(2.0, 2.0)) for label in LABELS[:-1] if labels[label]}

"""Synthetic patients, studies and labels for one site, and the sites that mirror the study's roles.

Every site draws patients (sex, age), gives each one or more studies (follow-ups a year or two apart),
each study a frontal image and sometimes a lateral one, and true findings whose prevalence rises with age
and differs by sex. Chronic findings (cardiomegaly) persist across a patient's studies. The labels a site
publishes are the true ones with some noise: that is what its native writer encodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.data.schema import LABELS
from pipelines.data.synthetic.render import Acquisition

FINDINGS = LABELS[:-1]


@dataclass(frozen=True)
class SiteSpec:
    """One synthetic site: its role, its native format, its population and its scanners.

    Attributes:
        name: folder under the data root; always says "synthetic".
        format: the adapter format its files are written in.
        role: ``public`` (pretraining source), ``private`` (DP training) or ``external`` (evaluation only).
        patients: number of patients at scale 1.
        female_fraction: share of women.
        age_mean: mean age in years.
        age_sd: standard deviation of age.
        prevalence_shift: added to every finding's log-odds.
        label_noise: probability that a published label is flipped.
        ap_fraction: share of frontal images taken AP (portable, sicker patients).
        lateral_fraction: share of studies that also have a lateral image.
        acquisition: the scanners' signature.
    """

    name: str
    format: str
    role: str
    patients: int
    female_fraction: float
    age_mean: float
    age_sd: float
    prevalence_shift: float
    label_noise: float
    ap_fraction: float
    lateral_fraction: float
    acquisition: Acquisition


SITES: tuple[SiteSpec, ...] = (
    SiteSpec("synthetic-mimic-cxr-jpg", "mimic-cxr-jpg", "public", 1500, 0.48, 62, 17, 0.2, 0.04, 0.45, 0.35,
             Acquisition(size=(256, 224), fov=2.15, gamma=1.0, noise=0.02, blur=1.0, marker="L")),
    SiteSpec("synthetic-uka-cxr-inhouse", "inhouse", "private", 1500, 0.4, 60, 19, 0.0, 0.03, 0.6, 0.0,
             Acquisition(size=(256, 256), fov=2.1, gamma=1.1, noise=0.015, blur=0.8, marker="R")),
    SiteSpec("synthetic-chexpert", "chexpert", "external", 300, 0.41, 60, 18, 0.3, 0.06, 0.7, 0.3,
             Acquisition(size=(292, 240), fov=2.3, gamma=0.8, noise=0.03, blur=1.4, marker="L", brightness=0.05)),
    SiteSpec("synthetic-chestxray14", "chestxray14", "external", 300, 0.44, 47, 16, -0.3, 0.1, 0.4, 0.0,
             Acquisition(size=(256, 256), fov=2.5, gamma=1.3, noise=0.045, blur=1.8, marker="")),
    SiteSpec("synthetic-padchest", "padchest", "external", 300, 0.5, 58, 19, 0.0, 0.05, 0.3, 0.3,
             Acquisition(size=(272, 272), fov=2.2, gamma=0.9, noise=0.025, blur=1.0, marker="R", brightness=-0.03)),
    SiteSpec("synthetic-vindr-cxr", "vindr-cxr", "external", 400, 0.47, 45, 14, -0.4, 0.05, 0.0, 0.0,
             Acquisition(size=(240, 240), fov=2.0, gamma=1.2, noise=0.035, blur=1.2, marker="")),
)


def sample_cohort(spec: SiteSpec, scale: float, rng: np.random.Generator) -> pd.DataFrame:
    """Draws the site's images.

    Args:
        spec: the site.
        scale: multiplies the number of patients.
        rng: the site's generator.

    Returns:
        One row per image: ``patient``, ``study``, ``study_in_patient``, ``sex``, ``age``, ``view``, the true
        findings as ``true_<label>`` and the published (noisy) labels as ``<label>``, all 0/1.
    """
    rows = []
    study = 0
    for patient in range(max(1, round(spec.patients * scale))):
        sex = "F" if rng.random() < spec.female_fraction else "M"
        age = float(np.clip(rng.normal(spec.age_mean, spec.age_sd), 18, 95))
        chronic = rng.random()           # a persistent tendency to heart disease
        visits = 1 + min(int(rng.poisson(0.6)), 3)
        for visit in range(visits):
            if visit:
                age = min(age + float(rng.uniform(0.2, 2.0)), 99.0)
            truth = _findings(age, sex, chronic, spec.prevalence_shift, rng)
            published = {label: int(value) ^ int(rng.random() < spec.label_noise) for label, value in truth.items()}
            published["no_finding"] = int(not any(published[f] for f in FINDINGS))
            frontal = "AP" if rng.random() < spec.ap_fraction else "PA"
            views = [frontal] + (["LATERAL"] if rng.random() < spec.lateral_fraction else [])
            for view in views:
                rows.append({"patient": patient, "study": study, "study_in_patient": visit, "sex": sex,
                             "age": round(age, 2), "view": view,
                             **{f"true_{k}": v for k, v in truth.items()}, **published})
            study += 1
    return pd.DataFrame(rows)


def _findings(age: float, sex: str, chronic: float, shift: float, rng: np.random.Generator) -> dict[str, int]:
    older = (age - 60) / 15
    male = 1.0 if sex == "M" else -1.0
    cardiomegaly = _draw(-1.6 + 0.9 * older + 0.25 * male + 2.0 * (chronic - 0.5) + shift, rng)
    effusion = _draw(-1.9 + 0.6 * older + 1.1 * cardiomegaly + shift, rng)
    pneumonia = _draw(-1.8 + 0.3 * older + 0.15 * male + shift, rng)
    atelectasis = _draw(-1.9 + 0.5 * older + 0.8 * effusion - 0.1 * male + shift, rng)
    truth = {"atelectasis": atelectasis, "cardiomegaly": cardiomegaly, "pleural_effusion": effusion,
             "pneumonia": pneumonia}
    truth["no_finding"] = int(not any(truth.values()))
    return truth


def _draw(logit: float, rng: np.random.Generator) -> int:
    return int(rng.random() < 1 / (1 + np.exp(-logit)))

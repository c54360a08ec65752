"""``params.yaml``, the project's one configuration source, as typed, strict dataclasses.

Every default lives in ``params.yaml``; the dataclasses here have none, so a key missing from the file is an
error just like an unknown one. Command-line overrides use dotted keys (``train.epsilon=3``) and go through
the same checks.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

# Stages run from the repository root (as DVC and MLflow Projects do), so paths in params.yaml are relative to it.
PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    """params.yaml (or an override) has an unknown key, a missing key or a value of the wrong type."""


@dataclass(frozen=True)
class Base:
    """Settings every stage shares.

    Attributes:
        seed: the seed of everything random that is not the synthetic data.
        image_size: side of the square training images in pixels.
        artifacts: folder of stage outputs.
    """

    seed: int
    image_size: int
    artifacts: str


@dataclass(frozen=True)
class Synthetic:
    """The embedded synthetic data set (``make data``).

    Attributes:
        seed: the generator's seed.
        scale: multiplies each site's number of patients.
    """

    seed: int
    scale: float


@dataclass(frozen=True)
class Site:
    """One data set in its native format.

    Attributes:
        format: the adapter (``mimic-cxr-jpg``, ``chexpert``, ``chestxray14``, ``padchest``, ``vindr-cxr``,
            ``inhouse``).
        role: ``private`` (the one DP training site), ``public`` (pretraining source) or ``external``
            (evaluation only).
        path: the data set's root folder, relative to the repository or absolute.
        options: adapter options (e.g. ``aggregation: any`` for VinDr-CXR).
    """

    format: str
    role: Literal["private", "public", "external"]
    path: str
    options: dict[str, str]


@dataclass(frozen=True)
class Data:
    """Where the data sets are and how their labels and views are harmonised.

    Attributes:
        synthetic: the embedded default's generator settings.
        uncertain: what an uncertain (-1) label becomes.
        not_mentioned: what a blank label becomes.
        frontal_only: keep only PA and AP images.
        sites: the data sets by site name.
    """

    synthetic: Synthetic
    uncertain: Literal["negative", "positive"]
    not_mentioned: Literal["negative", "positive"]
    frontal_only: bool
    sites: dict[str, Site]


@dataclass(frozen=True)
class Prepare:
    """The prepare stage.

    Attributes:
        val_fraction: share of the private site's patients in the validation split.
        test_fraction: share of the private site's patients in the test split.
        max_bad_fraction: the stage fails when a site has more unreadable images than this share.
        workers: decoding processes.
    """

    val_fraction: float
    test_fraction: float
    max_bad_fraction: float
    workers: int


@dataclass(frozen=True)
class Validate:
    """Thresholds of the Great Expectations gate (the validate stage).

    Attributes:
        max_sex_null_fraction: most images of a site whose sex may be unknown.
        max_age_null_fraction: most images of a site whose age may be unknown.
        min_age: youngest plausible age in years.
        max_age: oldest plausible age in years.
        min_sex_share: least share of each sex among a site's images of known sex.
        min_prevalence: least share of positives per label and site.
        max_prevalence: most share of positives per label and site.
        min_test_age_bin_count: least images per age bin in a site's test split.
    """

    max_sex_null_fraction: float
    max_age_null_fraction: float
    min_age: float
    max_age: float
    min_sex_share: float
    min_prevalence: float
    max_prevalence: float
    min_test_age_bin_count: int


@dataclass(frozen=True)
class Train:
    """DP-SGD training of one grid cell (the grid knobs are init, epsilon, model, data_fraction, seed).

    Attributes:
        init: ``scratch``, ``imagenet``, ``dinov3``, ``domain`` or ``checkpoint:<path>``.
        epsilon: target epsilon; ``.inf`` trains the non-private baseline with the same loop and data.
        model: ConvNeXt size.
        data_fraction: share of the private training patients used (the data-scale sweep).
        seed: seeds initialisation, sampling and noise (Opacus' secure RNG is unavailable with this torch).
        delta: target delta; must be below 1/N.
        accountant: ``prv`` (reported) or ``rdp``.
        unit: privacy unit, ``image`` or ``patient`` (Poisson-samples patients, one image each per step).
        max_grad_norm: per-sample clipping bound C.
        optimizer: ``adamw`` (DP-AdamW, the study's) or ``sgd``.
        lr: learning rate.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        epochs: planned epochs; the noise is calibrated over all their steps.
        logical_batch: expected logical batch size (sampling rate q = logical_batch / N).
        physical_batch: most examples in memory at once.
        augment: random horizontal flip and rotation (up to 7 degrees).
        self_check_images: images in the per-sample-gradient self-check before training.
    """

    init: str
    epsilon: float
    model: str
    data_fraction: float
    seed: int
    delta: float
    accountant: Literal["prv", "rdp"]
    unit: Literal["image", "patient"]
    max_grad_norm: float
    optimizer: Literal["adamw", "sgd"]
    lr: float
    weight_decay: float
    epochs: int
    logical_batch: int
    physical_batch: int
    augment: bool
    self_check_images: int


@dataclass(frozen=True)
class Pretrain:
    """Non-private supervised pretraining on the public source site (the ``domain`` initialization).

    Attributes:
        models: ConvNeXt sizes to pretrain; each becomes a registered model ``<registered_model>-<size>``.
        init: starting weights: ``scratch``, ``imagenet``, ``dinov3`` or ``checkpoint:<path>`` (the study: DINOv3).
        epochs: training epochs; the epoch with the best val mean AUROC (official val split) is kept.
        batch: mini-batch size (shuffled: the public source needs no privacy).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        augment: random horizontal flip and rotation.
        registered_model: prefix of the registered model names.
        alias: the alias pointing at the newest pretraining; ``init: domain`` resolves it.
    """

    models: list[str]
    init: str
    epochs: int
    batch: int
    lr: float
    weight_decay: float
    augment: bool
    registered_model: str
    alias: str


GRID_KNOBS = ("init", "epsilon", "model", "data_fraction", "seed")   # the train fields a grid cell varies
CELL = "cell.json"   # written by train into each cell folder: its knobs, which evaluate matches against the grid


@dataclass(frozen=True)
class Grid:
    """The study's matrix: every combination is one train cell (dvc.yaml's train stage, MLproject ``main``).

    Attributes:
        inits: initializations (``train.init`` values).
        epsilons: target epsilons; ``inf`` is the non-private baseline of each init.
        models: ConvNeXt sizes (the model-capacity sweep).
        data_fractions: shares of the private training patients (the data-scale sweep).
        seeds: seeds.
    """

    inits: list[str]
    epsilons: list[float]
    models: list[str]
    data_fractions: list[float]
    seeds: list[int]


@dataclass(frozen=True)
class Evaluate:
    """The evaluate stage.

    Attributes:
        resamples: bootstrap resamples of each evaluation set (shared by every model: paired comparisons).
        seed: seeds the resamples.
        threshold: ``val``: per-label threshold by Youden's J on the private val split, then fixed;
            ``resample``: re-chosen by Youden's J inside each test resample (the study's code).
        confidence: level of the percentile intervals.
        min_subgroup_positives: subgroups with fewer positives in some label are flagged.
    """

    resamples: int
    seed: int
    threshold: Literal["val", "resample"]
    confidence: float
    min_subgroup_positives: int


@dataclass(frozen=True)
class Register:
    """The register stage: which grid models enter the MLflow registry, under which aliases.

    Attributes:
        name: the registered model (one version per epsilon of the grid: its best cell on the private val split).
        aliases: alias -> the epsilon whose version it names (``inf``: the non-private baseline).
        private_aliases: aliases reserved for private models; pointing one at ``inf`` is refused.
    """

    name: str
    aliases: dict[str, float]
    private_aliases: list[str]


@dataclass(frozen=True)
class Serve:
    """The BentoML inference API.

    Attributes:
        alias: the registered version to serve (``register.name@alias``).
        max_request_bytes: larger request bodies get 413.
        max_batch_size: most images the adaptive batcher merges into one model call.
        max_latency_ms: the batcher's latency budget.
        token_env: environment variable holding the bearer token; unset or empty means no auth.
    """

    alias: str
    max_request_bytes: int
    max_batch_size: int
    max_latency_ms: int
    token_env: str


@dataclass(frozen=True)
class Params:
    """All of params.yaml."""

    base: Base
    data: Data
    prepare: Prepare
    validate: Validate
    pretrain: Pretrain
    train: Train
    grid: Grid
    evaluate: Evaluate
    register: Register
    serve: Serve

    def private_site(self) -> str:
        """The name of the one site with role ``private``."""
        return next(name for name, site in self.data.sites.items() if site.role == "private")

    def grid_cells(self) -> list[Train]:
        """Every cell of the grid as a train configuration (``train`` with the grid knobs replaced)."""
        g = self.grid
        return [dataclasses.replace(self.train, init=init, epsilon=eps, model=model, data_fraction=fraction, seed=seed)
                for init, eps, model, fraction, seed in itertools.product(
                    g.inits, g.epsilons, g.models, g.data_fractions, g.seeds)]

    def public_site(self) -> str:
        """The name of the site with role ``public`` (the pretraining source).

        Raises:
            ConfigError: no site has that role.
        """
        public = [name for name, site in self.data.sites.items() if site.role == "public"]
        if not public:
            raise ConfigError("no site in data.sites has role public: pretraining needs a public source")
        return public[0]


def load_params(path: Path = PARAMS_FILE, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Reads params.yaml, applies ``key.path=value`` overrides and checks every key and type.

    Args:
        path: the YAML file.
        overrides: dotted assignments; the value is parsed as YAML (``3``, ``true``, ``[1, 3]``).

    Raises:
        ConfigError: the one-line reason, naming the key.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"{path} not found: run from the repository root or pass --params") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    for override in overrides:
        _apply_override(raw, override)
    params = _build(Params, raw, "")
    _check(params)
    return params


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key.path=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"override {override!r}: unknown key {key!r}")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"override {override!r}: unknown key {key!r}")
    node[leaf] = yaml.safe_load(value)


def _build(kind: Any, value: Any, where: str) -> Any:
    """Converts a YAML value to ``kind``, naming the dotted key of anything wrong."""
    label = where or "params.yaml"
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{label} must be a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(kind)
        names = [f.name for f in dataclasses.fields(kind)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ConfigError(f"unknown key {_join(where, unknown[0])} in params.yaml; known keys here: {names}")
        missing = [n for n in names if n not in value]
        if missing:
            raise ConfigError(f"params.yaml lacks {_join(where, missing[0])}")
        return kind(**{n: _build(hints[n], value[n], _join(where, n)) for n in names})
    if origin is dict:
        key_type, value_type = typing.get_args(kind)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{label} must be a mapping")
        return {str(k): _build(value_type, v, _join(where, str(k))) for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{label} must be a list")
        return [_build(item_type, v, f"{label}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            raise ConfigError(f"{label} is {value!r}; allowed: {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        return _build(next(o for o in options if o is not type(None)), value, where)
    if kind is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-3" and "inf" as strings; as numbers they are what the user meant.
            try:
                return float(value.strip().lstrip("."))
            except ValueError:
                raise ConfigError(f"{label} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label} must be a number, got {value!r}")
        return float(value)
    if kind in (int, bool, str):
        if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if type(value) is not kind:
            raise ConfigError(f"{label} must be {kind.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {kind}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check(params: Params) -> None:
    private = [n for n, s in params.data.sites.items() if s.role == "private"]
    if len(private) != 1:
        raise ConfigError(f"data.sites must have exactly one site with role private, found {private}")
    public = [n for n, s in params.data.sites.items() if s.role == "public"]
    if len(public) > 1:
        raise ConfigError(f"data.sites may have one site with role public (the pretraining source), found {public}")
    p = params.prepare
    for key in ("val_fraction", "test_fraction", "max_bad_fraction"):
        if not 0 <= getattr(p, key) < 1:
            raise ConfigError(f"prepare.{key} must be in [0, 1)")
    if p.val_fraction + p.test_fraction >= 1:
        raise ConfigError("prepare.val_fraction + prepare.test_fraction must leave patients for training")
    if params.base.image_size < 16:
        raise ConfigError("base.image_size must be at least 16 pixels")
    if p.workers < 1:
        raise ConfigError("prepare.workers must be at least 1")
    if params.pretrain.epochs < 1 or params.pretrain.batch < 1 or not params.pretrain.models:
        raise ConfigError("pretrain.epochs and pretrain.batch must be positive and pretrain.models not empty")
    if params.pretrain.alias.lower() == "latest" or params.pretrain.alias.lower().lstrip("v").isdigit():
        raise ConfigError(f"pretrain.alias {params.pretrain.alias!r} is reserved by MLflow: choose another name")
    g = params.grid
    if not all([g.inits, g.epsilons, g.models, g.data_fractions, g.seeds]):
        raise ConfigError("every list in grid must have at least one value")
    if any(not eps > 0 for eps in g.epsilons) or any(not 0 < f <= 1 for f in g.data_fractions):
        raise ConfigError("grid.epsilons must be positive (inf for non-private) and grid.data_fractions in (0, 1]")
    if params.evaluate.resamples < 1 or not 0 < params.evaluate.confidence < 1:
        raise ConfigError("evaluate.resamples must be positive and evaluate.confidence in (0, 1)")
    r = params.register
    for alias, eps in r.aliases.items():
        if alias.lower() == "latest" or alias.lower().lstrip("v").isdigit():
            raise ConfigError(f"register.aliases: {alias!r} is reserved by MLflow: choose another name")
        if math.isinf(eps) and alias in r.private_aliases:
            raise ConfigError(f"register.aliases: {alias!r} is reserved for private models (register.private_aliases) "
                              f"and cannot name the non-private model")
        if eps not in g.epsilons:
            raise ConfigError(f"register.aliases: {alias!r} names epsilon {eps:g}, which is not in grid.epsilons")
    if params.serve.alias not in r.aliases:
        raise ConfigError(f"serve.alias {params.serve.alias!r} is not one of register.aliases {list(r.aliases)}")
    t = params.train
    if not t.epsilon > 0:
        raise ConfigError("train.epsilon must be positive (.inf for the non-private baseline)")
    if not 0 < t.delta < 1:
        raise ConfigError("train.delta must be in (0, 1)")
    if not 0 < t.data_fraction <= 1:
        raise ConfigError("train.data_fraction must be in (0, 1]")
    if t.physical_batch < 1 or t.logical_batch < 1 or t.epochs < 1 or t.max_grad_norm <= 0:
        raise ConfigError("train.physical_batch, logical_batch, epochs and max_grad_norm must be positive")

"""``params.yaml``, the project's one configuration source, as strict pydantic models.

Every default and the meaning of every key live in ``params.yaml``; these models hold the types, the
constraints and the rules that tie keys together, and have no defaults, so a key missing from the file is an
error just like an unknown one. Command-line overrides use dotted keys (``train.epsilon=3``) and go through
the same checks. Every error is one line naming the key.
"""

from __future__ import annotations

import difflib
import itertools
import math
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.cells import cell_name, epsilon_text, fraction_text
from serving.settings import Serve

# Stages run from the repository root (as DVC and MLflow Projects do), so paths in params.yaml are relative to it.
PARAMS_FILE = Path("params.yaml")
RESERVED_ALIASES = "latest"   # MLflow's, like v<number>


class ConfigError(ValueError):
    """params.yaml (or an override) has an unknown key, a missing key or a value of the wrong type."""


def _number(value: object) -> object:
    # YAML 1.1 reads "3e-3" and "inf" as strings; as numbers they are what the user meant.
    if isinstance(value, str):
        try:
            return float(value.strip().replace(".inf", "inf"))
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
    return value


def _text(value: object) -> object:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


Number = Annotated[float, BeforeValidator(_number)]
Share = Annotated[float, BeforeValidator(_number), Field(ge=0, lt=1)]
Text = Annotated[str, BeforeValidator(_text)]
Positive = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    """A params.yaml mapping: unknown keys are errors, values are not coerced, nothing is mutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _alias_free(alias: str, key: str) -> str:
    if alias.lower() == RESERVED_ALIASES or alias.lower().lstrip("v").isdigit():
        raise ValueError(f"{alias!r} is reserved by MLflow: choose another {key}")
    return alias


class Base(Section):
    """``base:`` in params.yaml."""

    seed: int
    image_size: int = Field(ge=16)
    artifacts: str
    device: Literal["auto", "cpu", "cuda"]


class Synthetic(Section):
    """``data.synthetic:`` in params.yaml."""

    seed: int
    scale: Number = Field(gt=0)
    public_scale: Number = Field(gt=0)


class Site(Section):
    """``data.sites.<name>:`` in params.yaml."""

    format: str
    role: Literal["private", "public", "external"]
    path: str
    options: dict[str, Text]

    @field_validator("options", mode="before")
    @classmethod
    def _empty(cls, value: object) -> object:
        return {} if value is None else value


class Data(Section):
    """``data:`` in params.yaml."""

    synthetic: Synthetic
    uncertain: Literal["negative", "positive"]
    not_mentioned: Literal["negative", "positive"]
    frontal_only: bool
    sites: dict[str, Site]

    @model_validator(mode="after")
    def _roles(self) -> Data:
        private = [n for n, s in self.sites.items() if s.role == "private"]
        if len(private) != 1:
            raise ValueError(f"sites must have exactly one site with role private, found {private}")
        public = [n for n, s in self.sites.items() if s.role == "public"]
        if len(public) > 1:
            raise ValueError(f"sites may have one site with role public (the pretraining source), found {public}")
        return self


class Prepare(Section):
    """``prepare:`` in params.yaml."""

    val_fraction: Share
    test_fraction: Share
    max_bad_fraction: Share
    workers: Positive

    @model_validator(mode="after")
    def _training_left(self) -> Prepare:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave patients for training")
        return self


class Validate(Section):
    """``validate:`` in params.yaml."""

    max_sex_null_fraction: Number
    max_age_null_fraction: Number
    min_age: Number
    max_age: Number
    min_sex_share: Number
    min_prevalence: Number
    max_prevalence: Number
    min_test_age_bin_count: int
    max_dropped_fraction: Share


class SelfSupervisedPretrain(Section):
    """``pretrain.ssl:`` in params.yaml."""

    method: Literal["simclr", "vicreg", "byol"]
    epochs: Positive
    batch: int = Field(gt=1)
    lr: Number
    min_scale: Number = Field(gt=0, le=1)


class Pretrain(Section):
    """``pretrain:`` in params.yaml."""

    methods: list[Literal["supervised", "ssl"]] = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    init: str
    epochs: Positive
    batch: Positive
    lr: Number
    weight_decay: Number
    augment: bool
    registered_model: str
    alias: str
    allow_unverified_init: bool
    ssl: SelfSupervisedPretrain

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError("each method once")
        return methods

    @field_validator("alias")
    @classmethod
    def _alias(cls, alias: str) -> str:
        return _alias_free(alias, "pretrain.alias")


class Train(Section):
    """``train:`` in params.yaml."""

    init: str
    epsilon: Number = Field(gt=0)
    model: str
    data_fraction: Number = Field(gt=0, le=1)
    seed: int
    delta: Number = Field(gt=0, lt=1)
    accountant: Literal["prv", "rdp"]
    unit: Literal["image", "patient"]
    max_grad_norm: Number = Field(gt=0)
    optimizer: Literal["adamw", "sgd"]
    lr: Number
    weight_decay: Number
    epochs: Positive
    logical_batch: Positive
    physical_batch: Positive
    engine: Literal["samplers", "bk"]
    processes: Positive
    augment: bool
    self_check_images: Positive
    reproducible: bool
    allow_unverified_init: bool

    @property
    def cell(self) -> str:
        """This configuration's grid cell name, e.g. ``scratch-8-atto-1.0-0``."""
        return cell_name(self.init, self.epsilon, self.model, self.data_fraction, self.seed)


def _spelled(render: Any, example: str) -> Any:
    """A before-validator for a grid list whose values name cells: each must be written as the cell spells it."""
    def check(values: object) -> object:
        if not isinstance(values, list):
            return values
        for value in values:
            written = str(value).lower() if isinstance(value, bool) else str(value)
            try:
                canonical = render(_number(value))
            except (TypeError, ValueError):
                continue   # the type check names it
            if written != canonical:
                raise ValueError(f"write {value!r} as {canonical}: grid values name the cells, e.g. {example}")
        return values
    return BeforeValidator(check)


class Privacy(Section):
    """``privacy:`` in params.yaml."""

    budget: Number = Field(gt=0)
    ledger: str


class Grid(Section):
    """``grid:`` in params.yaml."""

    inits: list[str] = Field(min_length=1)
    epsilons: Annotated[list[Annotated[Number, Field(gt=0)]], Field(min_length=1),
                        _spelled(epsilon_text, "train@scratch-8-atto-1.0-0")]
    models: list[str] = Field(min_length=1)
    data_fractions: Annotated[list[Annotated[Number, Field(gt=0, le=1)]], Field(min_length=1),
                              _spelled(fraction_text, "train@scratch-8-atto-0.5-0")]
    seeds: list[int] = Field(min_length=1)


class Evaluate(Section):
    """``evaluate:`` in params.yaml."""

    resamples: Positive
    seed: int
    threshold: Literal["val", "resample"]
    confidence: Number = Field(gt=0, lt=1)
    min_subgroup_positives: int


class Audit(Section):
    """``audit:`` in params.yaml."""

    cells: list[str] = Field(min_length=1)
    canaries: Positive
    magnitude: Number = Field(gt=1)
    input_canaries: int = Field(ge=0)
    confidence: Number = Field(gt=0, lt=1)


class Register(Section):
    """``register:`` in params.yaml."""

    name: str
    select: Literal["best-of-grid", "fixed"]
    aliases: dict[str, Number]
    fixed: dict[str, str]
    private_aliases: list[str]

    @model_validator(mode="after")
    def _aliases(self) -> Register:
        for alias, eps in self.aliases.items():
            _alias_free(alias, "alias in register.aliases")
            if math.isinf(eps) and alias in self.private_aliases:
                raise ValueError(f"aliases: {alias!r} is reserved for private models (register.private_aliases) "
                                 f"and cannot name the non-private model")
        return self


# The sections are named for their stages; two of those names are also (unused) attributes of pydantic's
# BaseModel (``validate``) and of Python's ABCMeta (``register``), which pydantic warns about when the class is made.
warnings.filterwarnings("ignore", message='Field name "(validate|register)" in "Params"', category=UserWarning)

class Params(Section):
    """All of params.yaml."""

    base: Base
    data: Data
    prepare: Prepare
    validate: Validate
    pretrain: Pretrain
    train: Train
    privacy: Privacy
    grid: Grid
    evaluate: Evaluate
    audit: Audit
    register: Register
    serve: Serve

    @model_validator(mode="after")
    def _cross_sections(self) -> Params:
        r = self.register
        for alias, eps in r.aliases.items():
            if eps not in self.grid.epsilons:
                raise ValueError(f"register.aliases: {alias!r} names epsilon {eps:g}, which is not in grid.epsilons")
        cells = {t.cell for t in self.grid_cells()}
        for cell in self.audit.cells:
            if cell not in cells:
                raise ValueError(f"audit.cells: {cell!r} is not a cell of the grid (audit a configuration it trains)")
        for alias, cell in r.fixed.items():
            _alias_free(alias, "alias in register.fixed")
            if cell not in cells:
                raise ValueError(f"register.fixed: {alias!r} names {cell!r}, which is not a cell of the grid")
            if alias in r.private_aliases and cell.split("-")[-4] == "inf":
                raise ValueError(f"register.fixed: {alias!r} is reserved for private models and cannot name {cell}")
        key = "fixed" if r.select == "fixed" else "aliases"
        if not getattr(r, key):
            raise ValueError(f"register.select is {r.select} but register.{key} names no model")
        if self.serve.alias not in getattr(r, key):
            raise ValueError(f"serve.alias {self.serve.alias!r} is not one of register.{key} {list(getattr(r, key))}")
        return self

    def private_site(self) -> str:
        """The name of the one site with role ``private``."""
        return next(name for name, site in self.data.sites.items() if site.role == "private")

    def public_site(self) -> str:
        """The name of the site with role ``public`` (the pretraining source).

        Raises:
            ConfigError: no site has that role.
        """
        public = [name for name, site in self.data.sites.items() if site.role == "public"]
        if not public:
            raise ConfigError("no site in data.sites has role public: pretraining needs a public source")
        return public[0]

    def grid_cells(self) -> list[Train]:
        """Every cell of the grid as a train configuration (``train`` with the grid knobs replaced)."""
        g = self.grid
        return [self.train.model_copy(update={"init": init, "epsilon": eps, "model": model, "data_fraction": fraction,
                                              "seed": seed})
                for init, eps, model, fraction, seed in itertools.product(
                    g.inits, g.epsilons, g.models, g.data_fractions, g.seeds)]

    def for_cell(self, train: Train) -> Params:
        """This configuration with ``train`` as the cell to train."""
        return self.model_copy(update={"train": train})


def dump_params(params: Params) -> str:
    """The resolved configuration, overrides included, as params.yaml text that ``load_params`` reads back as equal.

    A stage hands it to the processes it starts.
    """
    raw = params.model_dump()
    raw["grid"].update(epsilons=[epsilon_text(e) for e in params.grid.epsilons],
                       data_fractions=[fraction_text(f) for f in params.grid.data_fractions])
    return yaml.safe_dump(raw, sort_keys=False)


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
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from error
    for override in overrides:
        _apply_override(raw, override)
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, path)) from None


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
        raise ConfigError(f"override {override!r}: unknown key {key!r}{_suggest(leaf, node)}")
    node[leaf] = yaml.safe_load(value)


def _describe(error: ValidationError, path: Path) -> str:
    """The first problem pydantic found, as one line naming the dotted key."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"] if not str(part).startswith(("function-", "constrained-"))]
    key = ".".join(loc) or "params.yaml"
    if first["type"] == "extra_forbidden":
        return f"unknown key {key} in {path}{_suggest(loc[-1], _known_keys(loc[:-1]))}"
    if first["type"] == "missing":
        return f"{path} lacks {key}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {first['input']!r})" if "input" in first and not isinstance(
        first["input"], dict | list) else f"{key}: {message}"


def _known_keys(loc: list[str]) -> list[str]:
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _suggest(key: str, known: object) -> str:
    close = difflib.get_close_matches(key, [str(k) for k in known], n=1)
    return f" (did you mean {close[0]}?)" if close else ""

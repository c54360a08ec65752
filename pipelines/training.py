"""One DP-SGD (Opacus) training run of a timm ConvNeXt on the private site: what the train and audit stages run.

A run trains one grid cell (init, epsilon, model, data fraction, seed), named
``<init>-<epsilon>-<model>-<fraction>-<seed>`` everywhere (``pipelines.cells``), on the private site's train split,
and selects the epoch with the best val mean AUROC (the test split is never touched). Private runs use Poisson
sampling, per-sample clipping with exact per-sample gradients (checked against a per-example loop before training
starts), Gaussian noise calibrated to the target epsilon over all planned steps, and large logical batches through
BatchMemoryManager. ``epsilon: .inf`` trains the non-private baseline with the same Poisson-sampled data and the
same loop, without clipping or noise.

A train run writes under ``<artifacts>/train/<cell>/``: ``model.safetensors`` + ``spec.json`` (the selected
weights), ``privacy.json`` (the privacy record), ``history.json`` (per-epoch val AUROC, epsilon spent, steps),
``checkpoint/`` (every epoch: weights, optimizer, accountant history, RNG state, step), ``ledger.jsonl`` (one line
per executed step) and ``tracking.json`` (the key of its MLflow run); a resumed run's accountant counts every step
the ledger recorded, including those after the last checkpoint. An audit run (``canaries``) trains the same
configuration with gradient canaries and writes only its ledger and the canaries' scores under
``<artifacts>/audit/<cell>/``: its model is never saved.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import opacus
import torch
import yaml
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from tqdm import tqdm

from models.auditing import GradientCanaries, InputCanaries
from models.book_keeping import max_relative_error as book_keeping_error
from models.convnext import predict
from models.initialization import Initialized, initialize
from models.per_sample import TOLERANCE, max_relative_error
from models.privacy import (
    PrivacyRecord,
    Randomness,
    StepLedger,
    cross_check,
    ends_logical_step,
    json_value,
    make_private,
    plan_mechanism,
)
from models.weights import ModelSpec, load_model, save_model
from pipelines.budget import DataSet, LedgerRun, check_budget, composed_epsilon, histories, ledger_folder
from pipelines.cells import PRETRAINED_INITS, pretrained_name, run_name
from pipelines.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from pipelines.config import ConfigError, Params, Train
from pipelines.data.datasets import ImageDataset, PatientDataset
from pipelines.data.schema import LABELS
from pipelines.data.source import SOURCE, SourceOverlapError, refuse_overlap, weights_origin
from pipelines.data.splits import patient_unit_interval
from pipelines.data.store import METADATA, SiteStore, open_site
from pipelines.metrics import mean_auroc
from pipelines.processes import Processes, from_main, share_training_state
from pipelines.stage import StageError, compute_device
from pipelines.tracking import RUN_KEY_FILE, data_version, flatten
from pipelines.tracking_journal import tracked_run

# Opacus' hooks on the first layer (whose input needs no gradient) trigger this torch warning every step.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


@dataclass(frozen=True)
class Canaries:
    """An audit run's canaries.

    Attributes:
        count: white-box gradient canaries.
        magnitude: their norm before clipping, in units of C.
        inputs: black-box input canaries (public images with flipped labels); 0 for none.
    """

    count: int
    magnitude: float
    inputs: int


def run_training(params: Params, resume: bool = False, canaries: Canaries | None = None,
                 processes: Processes | None = None) -> dict[str, object]:
    """Trains one grid cell, logging to its MLflow run from before the first step.

    Before anything is written, the run plans its mechanism (sigma, q, steps) and checks that the data set's
    budget can pay for it. Each logical step is then appended to the cell's step ledger and to the data set's
    budget ledger before it runs. The MLflow run (``train@<cell>``) gets the resolved configuration at once and,
    after every epoch, the val mean AUROC and the epsilon spent so far; a run that fails or is stopped (SIGTERM,
    Ctrl-C) is marked failed with the epsilon it spent, and one killed outright is marked failed by the next
    run that starts. The run is journalled (``pipelines.tracking_journal``): if the tracking store does not
    answer, training goes on and the record is uploaded when it does.

    Args:
        params: the resolved configuration (``params.train`` is the cell).
        resume: continue from the cell's last checkpoint and step ledger instead of starting over.
        canaries: audit the cell's configuration instead (``audit@<cell>``): the same run with gradient canaries
            (``models.auditing.GradientCanaries``), charged to the data set's budget like any run, and no model kept.
        processes: this process's rank among those torchrun started for the cell, and its device (default: one
            process on ``base.device``). Every process trains its shard; rank 0 alone writes the outputs, the
            ledgers and the MLflow run, and adds the noise (Opacus' distributed optimizer).

    Returns:
        The privacy record and the selection result; for an audit, the canaries with their scores and the
        claimed epsilon.

    Raises:
        StageError: delta not below 1/N, the budget would be exceeded, a resumed run's settings differ, the
            per-sample gradient self-check failed, the accounting cross-check failed, or nothing to resume.
    """
    t = params.train
    cell = t.cell
    processes = processes or Processes(0, 1, compute_device(params))
    if canaries is not None and processes.count > 1:
        raise StageError("an audit trains in one process (its canaries join one clipped sum): run it without torchrun")
    main = processes.main
    stage, name = ("train", run_name(cell)) if canaries is None else ("audit", f"audit@{cell}")
    out = Path(params.base.artifacts) / stage / cell
    private = Path(params.base.artifacts) / "prepare" / params.private_site()
    store = open_site(private)
    train_rows, train_meta = _training_rows(store, t)
    labels = train_meta[list(LABELS)].to_numpy(np.float32)
    if t.unit == "patient":
        dataset = PatientDataset(store.images, train_rows, labels, train_meta["patient_id"].to_numpy(), t.augment)
    else:
        dataset = ImageDataset(store.images, train_rows, labels, t.augment)
    n = len(dataset)
    is_private = not math.isinf(t.epsilon)
    if is_private and t.delta >= 1 / n:
        raise StageError(f"train.delta={t.delta:g} is not below 1/N = 1/{n}; choose a smaller delta")
    settings = _guarantee_settings(params, n)
    ledger = StepLedger(out / "ledger.jsonl")
    if resume and main:
        _check_resumable(out, settings, ledger)
    data_set = DataSet(settings["data_version"], settings["prepare_digest"], t.unit)
    if is_private:
        mechanism = plan_mechanism(n, epsilon=t.epsilon, delta=t.delta, epochs=t.epochs,
                                   logical_batch=t.logical_batch, accountant=t.accountant)
        remaining = mechanism.steps - (ledger.steps() if resume else 0)
        if main:        # the ledgers are rank 0's; if it refuses, torchrun stops the other processes
            check_budget(params, data_set, [(mechanism.noise_multiplier, mechanism.sample_rate, max(remaining, 0))])
    initialized = _initialize(params, store, settings)    # refuses an init it cannot trace before writing anything
    randomness = (Randomness.public(t.seed, processes.rank, processes.device) if t.reproducible
                  else Randomness.secret(processes.device))
    public_images = None if canaries is None or not canaries.inputs else _canary_images(params, canaries.inputs,
                                                                                         randomness)
    if not resume and main:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    val_rows, val_meta = store.split("val")
    val_images, val_labels = np.asarray(store.images[val_rows]), val_meta[list(LABELS)].to_numpy()

    # One MLflow run per cell, whatever the number of processes; journalled, so the tracking store never stops it.
    with tracked_run(stage, name) if main else nullcontext(_Unlogged()) as log, _stopped_by_sigterm():
        log.set_tags({"dp_cxr.cell" if canaries is None else "dp_cxr.audited_cell": cell,
                      "privacy_unit": t.unit, "resumed": str(resume).lower(),
                      "noise_seed": randomness.kind, "privacy.data_set": data_set.key})
        log.log_params(flatten(params.model_dump()))
        state: dict[str, object] = _fresh_state()
        accountant, budget_run = None, None
        try:
            log.set_tags({"processes": str(processes.count), "device": processes.device.type,
                          "init_strategy": initialized.provenance.get("strategy", ""),
                          "init_source": initialized.provenance.get("source", ""),
                          "pretrain_run_id": initialized.provenance.get("pretrain_run_id", "")})
            model = plain = initialized.model.to(processes.device)
            if is_private:
                _self_check(model, dataset, t, processes.device)
            optimizer = _optimizer(model, t)
            torch.manual_seed(t.seed)     # initialisation and augmentation only: sampling and noise have their own
            if is_private:
                dp = make_private(model, optimizer, dataset, mechanism=mechanism, max_grad_norm=t.max_grad_norm,
                                  logical_batch=t.logical_batch, accountant=t.accountant, randomness=randomness,
                                  engine=t.engine)
                model, optimizer, loader = dp.model, dp.optimizer, dp.loader
                sigma, q, accountant = dp.noise_multiplier, dp.sample_rate, dp.engine.accountant
                if main:
                    budget_run = LedgerRun(ledger_folder(params), data_set, name, sigma, q, remaining)
            else:
                base = torch.utils.data.DataLoader(dataset, batch_size=min(t.logical_batch, n),
                                                   generator=randomness.sampling)
                loader = opacus.data_loader.DPDataLoader.from_data_loader(base)   # the same Poisson sampling
                sigma, q = 0.0, float(loader.sample_rate)
            log.log_metrics({"noise_multiplier": sigma, "sample_rate": q})
            audit = None if canaries is None else GradientCanaries(
                list(plain.parameters()), canaries.count, canaries.magnitude * t.max_grad_norm, q, randomness.canaries)
            inputs = None if public_images is None else InputCanaries(*public_images, q, randomness.canaries)
            if resume:
                state = from_main(_resume(out, plain, optimizer, accountant, ledger) if main else None, processes)
                share_training_state(plain, optimizer, processes)   # only rank 0's accountant is read

            spec = ModelSpec(size=t.model, image_size=params.base.image_size, init=initialized.provenance)
            steps_per_epoch = len(loader)
            for epoch in range(state["epoch"] + 1, t.epochs + 1):
                progress = tqdm(total=steps_per_epoch, desc=f"{name} epoch {epoch}/{t.epochs}", unit="step",
                                file=sys.stderr, mininterval=1.0, disable=not main)
                progress.set_postfix(eps=f"{state['epsilon']:.2f}")
                ledgers = (ledger, budget_run) if main else None
                if is_private:
                    _private_epoch(model, optimizer, loader, t, ledgers, (sigma, q), progress, audit, inputs,
                                   processes.device)
                    if budget_run is not None:
                        budget_run.sync()
                else:
                    _plain_epoch(model, optimizer, loader, t, ledgers, q * n, progress, audit, inputs,
                                 processes.device)
                state["step"] += steps_per_epoch
                progress.close()
                if not main:                        # rank 0 evaluates, records and checkpoints
                    state["epoch"] = epoch
                    continue
                if accountant is not None:
                    state["epsilon"] = float(accountant.get_epsilon(t.delta))
                val_auroc = mean_auroc(val_labels, predict(plain, val_images))
                state["history"].append({"epoch": epoch, "val_mean_auroc": val_auroc, "epsilon": state["epsilon"],
                                         "steps": state["step"]})
                log.log_metrics({"val_mean_auroc": val_auroc, "epsilon": _metric(state["epsilon"]),
                                 "steps": state["step"]}, step=epoch)
                print(f"{stage}: epoch {epoch}: val mean AUROC {val_auroc:.4f}, epsilon {state['epsilon']:.3f}, "
                      f"{state['step']} steps", file=sys.stderr)
                if val_auroc > state["best_auroc"] or state["best_epoch"] == 0:
                    state["best_auroc"], state["best_epoch"] = val_auroc, epoch
                    if audit is None:               # an audited model holds canaries: it is never kept
                        save_model(plain, spec, out)
                state["epoch"] = epoch
                if audit is None:
                    save_checkpoint(out / CHECKPOINT, plain, optimizer, {**state, "settings": settings})
        except BaseException as error:
            # What a failed or stopped run spent is part of its record (every executed step touched the data).
            spent = accountant.get_epsilon(t.delta) if accountant is not None and accountant.history else 0.0
            log.log_metric("epsilon_spent", _metric(spent if is_private else math.inf))
            if budget_run is not None:
                budget_run.close("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        if not main:
            return {"cell": cell, "rank": processes.rank}
        if budget_run is not None:
            budget_run.close("FINISHED")
        if audit is not None:
            history = ledger.history() if is_private else []
            claimed = _cross_checked(history, t) if history else {"reported": math.inf}
            if inputs is not None:
                inputs.score(plain)
            return {"cell": cell, "canaries": audit, "input_canaries": inputs, "epsilon": claimed["reported"],
                    "delta": t.delta,
                    "tracking": log, "out": out,
                    "noise_multiplier": sigma, "sample_rate": q, "steps": ledger.steps(), "n": n,
                    "noise_seed": randomness.kind, "data_set": data_set.key}

        record = _privacy_record(params, t, ledger.history() if is_private else [], sigma, q, n, state,
                                 initialized.provenance, randomness, data_set, settings, processes.count)
        (out / "privacy.json").write_text(record.to_json())
        (out / "history.json").write_text(json.dumps(state["history"], indent=2))
        (out / RUN_KEY_FILE).write_text(json.dumps({"run_key": log.key}))
        log.set_tags({"prepare_digest": record.prepare_digest})
        log.log_metrics({"final_epsilon": _metric(record.epsilon), "epsilon_spent": _metric(record.epsilon),
                         "data_set_epsilon": _metric(record.data_set_epsilon),
                         "best_val_mean_auroc": state["best_auroc"], "best_epoch": state["best_epoch"],
                         "steps": record.steps})
        for name in ("privacy.json", "spec.json", "history.json"):
            log.log_artifact(out / name)
        log.release()
    print(f"train: {cell}: best epoch {state['best_epoch']} (val mean AUROC {state['best_auroc']:.4f}), "
          f"epsilon {record.epsilon:.3f} at delta {t.delta:g} after {record.steps} steps -> {out}", file=sys.stderr)
    return {"cell": cell, "epsilon": record.epsilon, "best_epoch": state["best_epoch"],
            "val_mean_auroc": state["best_auroc"], "steps": record.steps, "noise_multiplier": sigma}


# The settings a guarantee depends on: a resumed run must have the same ones as the run it continues.
GUARANTEE_SETTINGS = ("epsilon", "delta", "epochs", "logical_batch", "max_grad_norm", "unit", "data_fraction",
                      "accountant", "model", "init", "reproducible")


def _guarantee_settings(params: Params, n: int) -> dict[str, object]:
    t = params.train
    return {**{key: json_value(getattr(t, key)) for key in GUARANTEE_SETTINGS}, "n": n,
            "data_version": data_version(), "prepare_digest": _prepare_digest(params)}


def _check_resumable(out: Path, settings: dict[str, object], ledger: StepLedger) -> None:
    """Refuses ``--resume`` when there is nothing to resume or a guarantee-relevant setting changed."""
    state_file = out / CHECKPOINT / "state.json"
    if not state_file.is_file() and ledger.steps() == 0:
        raise StageError(f"nothing to resume in {out}: run without --resume")
    if state_file.is_file():
        before = json.loads(state_file.read_text()).get("settings", {})
        changed = [key for key in settings if before.get(key) != settings[key]]
        if changed:
            key = changed[0]
            raise StageError(f"cannot resume {out.name}: {key} was {before.get(key)!r} in the checkpointed run and is "
                             f"{settings[key]!r} now (a guarantee covers one configuration); run without --resume")


def _metric(epsilon: float) -> float:
    """Epsilon as an MLflow metric (which cannot hold infinity): -1 for the non-private baseline."""
    return epsilon if math.isfinite(epsilon) else -1.0


@contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """Turns SIGTERM into an exception while training.

    SIGTERM is what DVC, MLflow and schedulers send to stop a job; as an exception, the MLflow run is closed
    as failed with what it spent instead of staying "running" forever.
    """
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:       # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _training_rows(store: object, t: Train) -> tuple[np.ndarray, object]:
    """The private train split, subsampled by patient to ``data_fraction`` (deterministic per seed)."""
    rows, meta = store.split("train")
    if t.data_fraction < 1:
        keep = meta["patient_id"].map(lambda p: patient_unit_interval(str(p), 1000 + t.seed) < t.data_fraction)
        rows, meta = rows[keep.to_numpy()], meta[keep].reset_index(drop=True)
    if len(rows) == 0:
        raise StageError("no training images left: raise train.data_fraction or check the prepare output")
    return rows, meta


def _initialize(params: Params, store: SiteStore, settings: dict[str, object]) -> Initialized:
    """The cell's starting model; ``domain`` and ``ssl`` come from the pretrain stage (registry alias or folder).

    ``domain`` is the supervised pretraining, ``ssl`` the self-supervised one; ``domain:<folder>`` and
    ``ssl:<folder>`` name a pretrain output folder instead of the registry. Weights from elsewhere
    (``checkpoint:``) must say what data they saw: see ``_checkpoint_provenance``.
    """
    t = params.train
    if t.init.startswith("checkpoint:"):
        provenance = _checkpoint_provenance(Path(t.init.removeprefix("checkpoint:")), params, store, settings)
        try:
            initialized = initialize(t.init, t.model, t.seed)
        except ValueError as error:
            raise StageError(str(error)) from error
        return Initialized(initialized.model, {**initialized.provenance, **provenance})
    strategy, _, folder = t.init.partition(":")
    if strategy not in PRETRAINED_INITS:
        try:
            return initialize(t.init, t.model, t.seed)
        except ValueError as error:
            raise StageError(str(error)) from error
    if folder:
        model, overlap = _load_pretrained(Path(folder), params, store, settings)
        return Initialized(model, {"strategy": strategy, "source": folder, **overlap})
    from models.registry import download, get_version

    method = PRETRAINED_INITS[strategy]
    name = f"{params.pretrain.registered_model}-{pretrained_name(method, t.model)}"
    try:
        registered = get_version(name, params.pretrain.alias)
    except LookupError as error:
        raise StageError(f"{error} (pretrain.methods must include {method}; then dvc repro pretrain, or mlflow run . "
                         f"-e pretrain)") from error
    with tempfile.TemporaryDirectory(prefix="dp-cxr-pretrained-") as scratch:
        model, overlap = _load_pretrained(download(registered, Path(scratch)), params, store, settings)
    provenance = {**overlap, "strategy": strategy, "source": f"models:/{name}@{params.pretrain.alias}",
                  "registered_model": name, "version": registered.version, "pretrain_run_id": registered.run_id,
                  "pretrain_data_version": registered.tags.get("source_data_version", "")}
    return Initialized(model, provenance)


def _checkpoint_provenance(path: Path, params: Params, store: SiteStore, settings: dict[str, object]
                           ) -> dict[str, str]:
    """What a ``checkpoint:`` init saw, and the refusal of weights that saw the private site without DP.

    A folder made by the pretrain stage carries ``source.json`` (checked for overlap like ``domain``); one made by
    the train stage carries ``privacy.json`` (refused when it trained non-privately on this private data set).
    Anything else has unknown provenance and is refused unless ``train.allow_unverified_init`` is true.

    Raises:
        StageError: the provenance is unknown (and not allowed) or the weights saw the private site without DP.
    """
    origin = weights_origin(path)
    if origin is None:
        return _unverified(f"{path} carries no provenance (no source.json or privacy.json beside it)", params)
    if "privacy_record" in origin:
        return _trained_by_us(origin["privacy_record"], path, settings)
    return {"provenance": f"pretrained on {origin['site']}", **_overlap(origin, path, params, store, settings)}


def _trained_by_us(record: dict[str, object], path: Path, settings: dict[str, object]) -> dict[str, str]:
    """The provenance of train-stage weights; refused when they saw this private data set without DP."""
    same_data = record.get("prepare_digest") == settings["prepare_digest"]
    if same_data and str(record.get("epsilon")) == "inf":
        raise StageError(f"{path} was trained non-privately on this private site (its privacy record says "
                         f"epsilon = inf): starting from it would release that data without the DP guarantee")
    return {"provenance": f"trained by DP-CXR, epsilon {record.get('epsilon')} on "
                          f"{'this private data set' if same_data else 'another data set'}"}


def _unverified(problem: str, params: Params) -> dict[str, str]:
    if not params.train.allow_unverified_init:
        raise StageError(f"{problem}: what data it saw is unknown, so it may hold the private site without DP; use "
                         f"weights made by the pretrain or train stage, or set train.allow_unverified_init: true (the "
                         f"record and card show it)")
    return {"provenance": "UNVERIFIED: what these weights saw is unknown (train.allow_unverified_init)"}


def _overlap(manifest: dict[str, object], path: Path, params: Params, store: SiteStore,
             settings: dict[str, object]) -> dict[str, str]:
    """The overlap counts of a pretrained model's sources with the private site (all zero, or refused).

    Also the verdict on the weights the first pretraining of the chain started from, when those saw data.
    """
    try:
        counts, start = refuse_overlap(manifest, store, params.data.sites[params.private_site()].format)
    except SourceOverlapError as error:
        raise StageError(str(error)) from None
    found = {f"overlap.{key}": str(value) for key, value in counts.items()}
    if start is None:
        return found
    if "privacy_record" in start:
        return {**found, "pretrain_init": _trained_by_us(start["privacy_record"], path, settings)["provenance"]}
    return {**found, "pretrain_init": _unverified(f"{path} was pretrained from {start['unverified']}, which carries "
                                                  f"no provenance", params)["provenance"]}


def _load_pretrained(folder: Path, params: Params, store: SiteStore, settings: dict[str, object]
                     ) -> tuple[nn.Module, dict[str, str]]:
    """The pretrain stage's model in ``folder``, once it is known to share no data with the private site."""
    manifest = weights_origin(folder)
    if manifest is None or "content_hashes" not in manifest:
        raise StageError(f"{folder / SOURCE} is missing: without the pretraining source manifest the overlap with "
                         f"the private site cannot be checked; pretrain with this version's pretrain stage")
    overlap = _overlap(manifest, folder, params, store, settings)
    model, spec = load_model(folder)
    if (spec.size, spec.image_size) != (params.train.model, params.base.image_size):
        raise StageError(f"the pretrained model in {folder} is convnext_{spec.size} at {spec.image_size} px; this cell "
                         f"is convnext_{params.train.model} at {params.base.image_size} px: pretrain that size")
    return model, overlap


def _canary_images(params: Params, count: int, randomness: Randomness) -> tuple[np.ndarray, np.ndarray]:
    """Images and true labels for black-box canaries: ``count`` images of the public source, never private ones.

    Raises:
        StageError: there is no public source, or it has fewer images than ``count``.
    """
    try:
        site = params.public_site()
    except ConfigError as error:
        raise StageError(f"black-box canaries are public-source images: {error} (or set audit.input_canaries: 0)"
                         ) from None
    store = open_site(Path(params.base.artifacts) / "prepare" / site)
    if len(store.metadata) < count:
        raise StageError(f"audit.input_canaries={count} needs as many public images; {site} has "
                         f"{len(store.metadata)}: lower it")
    rows = np.sort(torch.randperm(len(store.metadata), generator=randomness.canaries)[:count].numpy())
    return np.asarray(store.images[rows]), store.metadata.iloc[rows][list(LABELS)].to_numpy()


def _self_check(model: nn.Module, dataset: torch.utils.data.Dataset, t: Train, device: torch.device) -> None:
    count = min(t.self_check_images, len(dataset))
    x = torch.stack([dataset[i][0] for i in range(count)]).to(device)
    y = torch.stack([dataset[i][1] for i in range(count)]).to(device)
    what, check = (("per-example norms and clipped sums", book_keeping_error) if t.engine == "bk"
                   else ("per-sample gradients", max_relative_error))
    error = check(model, x, y)
    if error > TOLERANCE:
        raise StageError(f"{what} of convnext_{t.model} ({t.engine} engine) are not exact (relative error "
                         f"{error:.2e} > {TOLERANCE:g} against a per-example loop): refusing to train, the epsilon "
                         f"would be false")
    print(f"train: {what} self-check passed ({t.engine} engine, max relative error {error:.1e})", file=sys.stderr)


def _optimizer(model: nn.Module, t: Train) -> torch.optim.Optimizer:
    if t.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example loss: binary cross-entropy summed over the labels."""
    return nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none").sum(dim=1)


def _private_epoch(model: nn.Module, optimizer: object, loader: object, t: Train,
                   ledgers: tuple[StepLedger, LedgerRun] | None, mechanism: tuple[float, float], progress: tqdm,
                   canaries: GradientCanaries | None, inputs: InputCanaries | None, device: torch.device) -> None:
    """One epoch of DP-SGD: Poisson logical batches in physical chunks; clipping and noise at each logical step.

    No statistic of the training examples (not even their mean loss) leaves this loop: it would be released
    without the DP guarantee. An audit's gradient canaries join each logical step's clipped sums and read the
    released noisy gradient after it; its input canaries join the step's last physical batch as examples.
    ``ledgers`` is None in the processes other than rank 0 (which records every logical step once).
    """
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=t.physical_batch,
                            optimizer=optimizer) as batches:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            final = ends_logical_step(optimizer)
            if final and ledgers is not None:   # recorded before the step that releases noise about these examples
                ledgers[0].record(*mechanism)
                ledgers[1].step()
            if final and inputs is not None:
                x, y = inputs.join(x, y)
            optimizer.zero_grad()
            _losses(model, x, y).mean().backward()
            if final and canaries is not None:
                canaries.add_clipped(optimizer)
            optimizer.step()                # accumulates, or clips + noises + updates at the logical batch's end
            if final:
                if canaries is not None:
                    canaries.observe()
                progress.update(1)


def _plain_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: object, t: Train,
                 ledgers: tuple[StepLedger, None] | None, expected_batch: float, progress: tqdm,
                 canaries: GradientCanaries | None, inputs: InputCanaries | None, device: torch.device) -> None:
    """One non-private epoch over the same Poisson logical batches, averaged over the expected batch size."""
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if ledgers is not None:
            ledgers[0].record(0.0, float(loader.sample_rate))
        if inputs is not None:
            x, y = inputs.join(x, y)
        optimizer.zero_grad()
        for cx, cy in zip(torch.split(x, t.physical_batch), torch.split(y, t.physical_batch), strict=True):
            (_losses(model, cx, cy).sum() / expected_batch).backward()
        if canaries is not None:
            canaries.add_to_gradient(1 / expected_batch)
        optimizer.step()
        if canaries is not None:
            canaries.observe()
        progress.update(1)


class _Unlogged:
    """What the processes other than rank 0 log to MLflow: nothing (the cell has one run, rank 0's)."""

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def _fresh_state() -> dict[str, object]:
    return {"epoch": 0, "step": 0, "epsilon": 0.0, "best_auroc": float("-inf"), "best_epoch": 0, "history": []}


def _resume(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, accountant: object,
            ledger: StepLedger) -> dict[str, object]:
    """Restores the last checkpoint and charges the accountant for every step the ledger recorded.

    The ledger, not the checkpoint, is the record of what touched the data: each of its segments is charged
    with its own (sigma, q), including the steps that ran after the last checkpoint.
    """
    state = _fresh_state()
    if (out / CHECKPOINT).is_dir():
        meta = load_checkpoint(out / CHECKPOINT, model, optimizer)
        meta.pop("settings", None)
        state.update(meta)
    after_checkpoint = ledger.steps() - state["step"]
    state["step"] = ledger.steps()
    if accountant is not None:
        accountant.history = ledger.history()
    print(f"train: resumed after epoch {state['epoch']} with {state['step']} steps charged "
          f"({max(after_checkpoint, 0)} from the ledger after the last checkpoint)", file=sys.stderr)
    return state


def _privacy_record(params: Params, t: Train, history: list[tuple[float, float, int]], sigma: float, q: float,
                    n: int, state: dict[str, object], init: dict[str, str], randomness: Randomness,
                    data_set: DataSet, settings: dict[str, object], processes: int) -> PrivacyRecord:
    if history:
        epsilons = _cross_checked(history, t)
        ledgers = histories(ledger_folder(params), data_set).values()
        data_set_epsilon = composed_epsilon([segment for run in ledgers for segment in run], t.delta)
    else:
        epsilons = {"reported": float("inf"), "pld": float("inf"), "rdp": float("inf")}
        data_set_epsilon = float("inf")
    return PrivacyRecord(
        epsilon=epsilons["reported"], delta=t.delta, accountant=t.accountant if history else "none",
        noise_multiplier=sigma, sample_rate=q, steps=int(state["step"]), epochs=int(state["epoch"]),
        max_grad_norm=t.max_grad_norm if history else float("inf"), unit=t.unit, n=n,
        epsilon_pld=epsilons["pld"], epsilon_rdp=epsilons["rdp"], history=[list(h) for h in history],
        opacus_version=opacus.__version__, torch_version=torch.__version__, **randomness.describe(),
        data_version=str(settings["data_version"]), prepare_digest=str(settings["prepare_digest"]),
        data_set=data_set.key, data_set_epsilon=data_set_epsilon, init=init, engine=t.engine if history else "none",
        processes=processes)


def _cross_checked(history: list[tuple[float, float, int]], t: Train) -> dict[str, float]:
    try:
        return cross_check(history, t.delta, t.accountant)
    except RuntimeError as error:
        raise StageError(f"privacy accounting cross-check failed: {error}") from error


def _prepare_digest(params: Params) -> str:
    """The DVC md5 of the prepare output (dvc.lock), else a hash of the private site's metadata table."""
    try:
        lock = yaml.safe_load(Path("dvc.lock").read_text())
        outs = lock["stages"]["prepare"]["outs"]
        return str(next(o["md5"] for o in outs if o["path"].endswith("prepare")))
    except (OSError, KeyError, TypeError, StopIteration):
        path = Path(params.base.artifacts) / "prepare" / params.private_site() / METADATA
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:32]

"""The pretrain stage: non-private pretraining on the public source site (the ``domain`` and ``ssl`` inits).

For each method in ``pretrain.methods`` and each model size, trains a ConvNeXt (same factory, preprocessing and
weight format as the train stage) on the public source's official train split:

- ``supervised`` learns its labels, keeps the epoch with the best mean AUROC on its official val split and
  registers ``<pretrain.registered_model>-<size>`` (what ``train.init: domain`` starts from);
- ``ssl`` learns from its images alone, never a label (``pipelines.self_supervised``, ``pretrain.ssl``), keeps
  the last epoch and registers ``<pretrain.registered_model>-ssl-<size>`` (``train.init: ssl``).

Both are measured by a linear probe on the public source (``pipelines.probe``) against a random network of the
same size, and registered with the alias ``pretrain.alias``. The public data needs no privacy, so mini-batches are
shuffled, not Poisson-sampled, and there is no clipping or noise.

Outputs under ``<artifacts>/pretrain/<size>/`` (supervised) and ``<artifacts>/pretrain/ssl-<size>/``:
``model.safetensors`` + ``spec.json``, ``metrics.json``, ``history.json``, ``source.json`` (the content hashes,
near-duplicate signatures and hashed patient ids of every public image, which the train stage uses to refuse a
private site that overlaps the pretraining data) and ``checkpoint/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.convnext import predict
from models.device import model_device
from models.initialization import initialize
from models.weights import ModelSpec, load_model, save_model
from pipelines.cells import pretrained_name
from pipelines.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from pipelines.config import Params
from pipelines.data.datasets import ImageDataset
from pipelines.data.schema import LABELS
from pipelines.data.source import SOURCE, source_manifest, weights_origin
from pipelines.data.store import SiteStore, open_site
from pipelines.metrics import mean_auroc
from pipelines.probe import linear_probe
from pipelines.self_supervised import SelfSupervised, UnlabeledViews
from pipelines.stage import StageError, compute_device, run_stage
from pipelines.tracking import data_version, stage_run

STAGE = "pretrain"


def pretrain(params: Params, resume: bool = False) -> list[dict[str, object]]:
    """Pretrains and registers one model per method in ``pretrain.methods`` and size in ``pretrain.models``.

    Args:
        params: the resolved configuration.
        resume: continue each model from its last checkpoint.

    Returns:
        Per model: its method, size, metrics (the linear probe's among them) and registered version.
    """
    device = compute_device(params)
    site = params.public_site()
    store = open_site(Path(params.base.artifacts) / "prepare" / site)
    for split in ("train", "val", "test"):
        if not len(store.split(split)[0]):
            raise StageError(f"the public source {site} has no {split} images: check its official split")
    missing = [label for label in LABELS if label not in store.metadata.columns]
    if "supervised" in params.pretrain.methods and missing:
        raise StageError(f"the public source {site} has no label column {missing[0]}: the supervised method learns "
                         f"its labels; pretrain it with pretrain.methods: [ssl], which needs none")
    methods = {"supervised": _supervised, "ssl": _self_supervised}
    return [_pretrain_one(params, store, site, method, size, methods[method], resume, device)
            for method in params.pretrain.methods for size in params.pretrain.models]


Fit = Callable[[Params, SiteStore, nn.Module, ModelSpec, Path, bool],
               tuple[nn.Module, dict[str, float], list[dict[str, float]]]]


def _pretrain_one(params: Params, store: SiteStore, site: str, method: str, size: str, fit: Fit,
                  resume: bool, device: torch.device) -> dict[str, object]:
    """Trains one model with ``fit`` under its own MLflow run, then records, probes and registers it."""
    import mlflow

    from models.registry import register

    p = params.pretrain
    name = pretrained_name(method, size)
    out = Path(params.base.artifacts) / STAGE / name
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    origin, version_of_data = init_origin(params), data_version()
    initialized = initialize(p.init, size, params.base.seed)
    initialized.model.to(device)
    spec = ModelSpec(size=size, image_size=params.base.image_size,
                     init={**initialized.provenance, "pretrained_on": site, "pretrain_method": method,
                           "pretrain_data_version": version_of_data})
    # The run opens before the first step, so every epoch can be watched and a failed run leaves its record.
    with stage_run(STAGE):
        mlflow.set_tags({"dp_cxr.pretrain_size": size, "pretrain_method": method, "source_site": site,
                         "resumed": str(resume).lower()})
        settings = p.ssl.model_dump() if method == "ssl" else p.model_dump(exclude={"models", "methods", "ssl"})
        mlflow.log_params({f"pretrain.{k}": v for k, v in settings.items()} | {"model": size, "method": method})
        model, metrics, history = fit(params, store, initialized.model, spec, out, resume)
        metrics = {**metrics, **linear_probe(model, size, store, params.base.seed)}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "history.json").write_text(json.dumps(history, indent=2))
        (out / SOURCE).write_text(json.dumps(source_manifest(store, site, params.data.sites[site].format,
                                                             version_of_data, init=origin)))
        mlflow.log_metrics(metrics)
        tags = {"source_site": site, "source_data_version": version_of_data, "pretrain_method": method,
                "base_init": spec.init.get("strategy", p.init), "model_size": size, "image_size": spec.image_size,
                "epochs": p.ssl.epochs if method == "ssl" else p.epochs, "privacy": "none (public data, non-private)",
                **({"ssl_method": p.ssl.method} if method == "ssl" else {}),
                **{k: f"{v:.4f}" for k, v in metrics.items() if k.startswith(("test_mean", "probe_"))}}
        version = register(out, f"{p.registered_model}-{name}", tags, aliases=[p.alias],
                           extra_artifacts={"source": out / SOURCE})
    fitted = (f"best epoch {metrics['best_epoch']} (val mean AUROC {metrics['val_mean_auroc']:.4f}, {site} test "
              f"{metrics['test_mean_auroc']:.4f})" if method == "supervised"
              else f"{p.ssl.method}, {p.ssl.epochs} epochs")
    probe = (f", linear probe {metrics['probe_test_mean_auroc']:.4f} against a random init's "
             f"{metrics['probe_random_init_test_mean_auroc']:.4f}" if "probe_test_mean_auroc" in metrics else "")
    print(f"pretrain: {name}: {fitted}{probe} -> {out}, registered {version.name} v{version.version} @{p.alias}",
          file=sys.stderr)
    return {"method": method, "size": size, **metrics, "registered_model": version.name, "version": version.version}


def _supervised(params: Params, store: SiteStore, model: nn.Module, spec: ModelSpec, out: Path, resume: bool
                ) -> tuple[nn.Module, dict[str, float], list[dict[str, float]]]:
    """Learns the public labels; keeps the epoch with the best val mean AUROC, measured on the test split."""
    import mlflow

    p = params.pretrain
    rows, meta = store.split("train")
    dataset = ImageDataset(store.images, rows, meta[list(LABELS)].to_numpy(np.float32), p.augment)
    val_rows, val_meta = store.split("val")
    val_images, val_labels = np.asarray(store.images[val_rows]), val_meta[list(LABELS)].to_numpy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    generator = torch.Generator().manual_seed(params.base.seed)
    device = model_device(model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=p.batch, shuffle=True, generator=generator,
                                         pin_memory=device.type == "cuda")
    state = _resumed(out, model, optimizer, generator, resume,
                     {"epoch": 0, "best_auroc": float("-inf"), "best_epoch": 0, "history": []})
    for epoch in range(state["epoch"] + 1, p.epochs + 1):
        model.train()
        loss_sum = 0.0
        for x, y in tqdm(loader, desc=f"pretrain {spec.size} epoch {epoch}/{p.epochs}", unit="batch",
                         file=sys.stderr, mininterval=1.0):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none").sum(dim=1).mean()
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(x)
        val_auroc = mean_auroc(val_labels, predict(model, val_images))
        # The public source needs no privacy: its training loss may be logged.
        row = {"epoch": epoch, "train_loss": loss_sum / len(dataset), "val_mean_auroc": val_auroc}
        state["history"].append(row)
        mlflow.log_metrics({"train_loss": row["train_loss"], "val_mean_auroc": val_auroc}, step=epoch)
        print(f"pretrain: {spec.size} epoch {epoch}: val mean AUROC {val_auroc:.4f}", file=sys.stderr)
        if val_auroc > state["best_auroc"] or state["best_epoch"] == 0:
            state["best_auroc"], state["best_epoch"] = val_auroc, epoch
            save_model(model, spec, out)
        state["epoch"] = epoch
        save_checkpoint(out / CHECKPOINT, model, optimizer, {**state, "generator": generator.get_state().tolist()})

    best = load_model(out)[0].to(device)
    test_rows, test_meta = store.split("test")
    test_scores = predict(best, np.asarray(store.images[test_rows]))
    test_labels = test_meta[list(LABELS)].to_numpy()
    metrics = {"best_epoch": state["best_epoch"], "val_mean_auroc": state["best_auroc"],
               "test_mean_auroc": mean_auroc(test_labels, test_scores),
               **{f"test_auroc.{label}": mean_auroc(test_labels[:, [k]], test_scores[:, [k]])
                  for k, label in enumerate(LABELS)}}
    return best, metrics, state["history"]


def _self_supervised(params: Params, store: SiteStore, model: nn.Module, spec: ModelSpec, out: Path, resume: bool
                     ) -> tuple[nn.Module, dict[str, float], list[dict[str, float]]]:
    """Learns from the public train split's images alone (no label is read); keeps the last epoch."""
    import mlflow

    s = params.pretrain.ssl
    rows, _ = store.split("train")
    device = model_device(model)
    learner = SelfSupervised(model, s.method).to(device)
    dataset = UnlabeledViews(store.images, rows, params.base.image_size, s.min_scale)
    optimizer = torch.optim.AdamW([w for w in learner.parameters() if w.requires_grad], lr=s.lr,
                                  weight_decay=params.pretrain.weight_decay)
    generator = torch.Generator().manual_seed(params.base.seed)
    # Contrastive and variance terms need full batches: a last batch of a few images would dominate its step.
    loader = torch.utils.data.DataLoader(dataset, batch_size=s.batch, shuffle=True, generator=generator,
                                         drop_last=len(dataset) > s.batch, pin_memory=device.type == "cuda")
    state = _resumed(out, learner, optimizer, generator, resume, {"epoch": 0, "history": []})
    total_steps, step = s.epochs * len(loader), state["epoch"] * len(loader)
    for epoch in range(state["epoch"] + 1, s.epochs + 1):
        learner.train()
        loss_sum, seen = 0.0, 0
        for first, second in tqdm(loader, desc=f"pretrain ssl-{spec.size} epoch {epoch}/{s.epochs}", unit="batch",
                                  file=sys.stderr, mininterval=1.0):
            loss = learner.loss(first.to(device, non_blocking=True), second.to(device, non_blocking=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            learner.after_step(step, total_steps)
            step += 1
            loss_sum, seen = loss_sum + float(loss.detach()) * len(first), seen + len(first)
        state["history"].append({"epoch": epoch, "ssl_loss": loss_sum / seen})
        mlflow.log_metric("ssl_loss", loss_sum / seen, step=epoch)
        print(f"pretrain: ssl-{spec.size} epoch {epoch}: {s.method} loss {loss_sum / seen:.4f}", file=sys.stderr)
        state["epoch"] = epoch
        save_checkpoint(out / CHECKPOINT, learner, optimizer, {**state, "generator": generator.get_state().tolist()})
    save_model(learner.backbone, spec, out)
    return learner.backbone, {"epochs": s.epochs, "ssl_loss": state["history"][-1]["ssl_loss"]}, state["history"]


def _resumed(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
             resume: bool, fresh: dict[str, object]) -> dict[str, object]:
    """The progress to start from: the checkpoint's when resuming and there is one, else ``fresh``."""
    if not (resume and (out / CHECKPOINT).is_dir()):
        return fresh
    state = load_checkpoint(out / CHECKPOINT, model, optimizer)
    generator.set_state(torch.tensor(state.pop("generator"), dtype=torch.uint8))
    print(f"pretrain: {out.name}: resumed after epoch {state['epoch']}", file=sys.stderr)
    return state


def init_origin(params: Params) -> dict[str, object] | None:
    """What a ``checkpoint:`` init saw, carried into ``source.json`` so every training from the result checks it.

    Raises:
        StageError: the weights carry no provenance and ``pretrain.allow_unverified_init`` is false.
    """
    if not params.pretrain.init.startswith("checkpoint:"):
        return None
    path = Path(params.pretrain.init.removeprefix("checkpoint:"))
    origin = weights_origin(path)
    if origin is not None:
        return origin
    if not params.pretrain.allow_unverified_init:
        raise StageError(f"{path} carries no provenance (no source.json or privacy.json beside it): what data it saw "
                         f"is unknown, so it may hold the private site without DP; use weights made by the pretrain "
                         f"or train stage, or set pretrain.allow_unverified_init: true")
    return {"unverified": str(path)}


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.pretrain [--resume] [-P pretrain.methods=[ssl] ...]``."""
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--resume", action="store_true", help="continue each model from its last checkpoint")

    run_stage(STAGE, lambda params, args: pretrain(params, resume=args.resume), argv, flags)


if __name__ == "__main__":
    main()

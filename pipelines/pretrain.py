"""The pretrain stage: non-private supervised pretraining on the public source site (the ``domain`` init).

For each configured model size, trains a ConvNeXt (same factory, preprocessing and weight format as the train
stage) on the public source's official train split, keeps the epoch with the best mean AUROC on its official
val split, measures it on its test split, and registers it in the MLflow registry as
``<pretrain.registered_model>-<size>`` with the alias ``pretrain.alias``. The public data needs no privacy, so
mini-batches are shuffled, not Poisson-sampled, and there is no clipping or noise.

Outputs under ``<artifacts>/pretrain/<size>/``: ``model.safetensors`` + ``spec.json``, ``metrics.json``,
``history.json``, ``source.json`` (the content hashes and hashed patient ids of every public image, which the
train stage uses to refuse a private site that overlaps the pretraining data) and ``checkpoint/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.convnext import predict
from models.initialization import initialize
from models.weights import ModelSpec, load_model, save_model
from pipelines.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from pipelines.config import Params
from pipelines.data.datasets import ImageDataset
from pipelines.data.schema import LABELS
from pipelines.data.source import SOURCE, source_manifest, weights_origin
from pipelines.data.store import SiteStore, open_site
from pipelines.metrics import mean_auroc
from pipelines.stage import StageError, run_stage
from pipelines.tracking import data_version, stage_run

STAGE = "pretrain"


def pretrain(params: Params, resume: bool = False) -> list[dict[str, object]]:
    """Pretrains and registers one model per size in ``pretrain.models``.

    Args:
        params: the resolved configuration.
        resume: continue each size from its last checkpoint.

    Returns:
        Per size: the selected epoch, val and source-test mean AUROC, and the registered version.
    """
    site = params.public_site()
    store = open_site(Path(params.base.artifacts) / "prepare" / site)
    for split in ("train", "val", "test"):
        if not len(store.split(split)[0]):
            raise StageError(f"the public source {site} has no {split} images: check its official split")
    return [_pretrain_size(params, store, site, size, resume) for size in params.pretrain.models]


def _pretrain_size(params: Params, store: SiteStore, site: str, size: str, resume: bool) -> dict[str, object]:
    import mlflow

    from models.registry import register

    p = params.pretrain
    out = Path(params.base.artifacts) / STAGE / size
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    rows, meta = store.split("train")
    dataset = ImageDataset(store.images, rows, meta[list(LABELS)].to_numpy(np.float32), p.augment)
    val_rows, val_meta = store.split("val")
    val_images, val_labels = np.asarray(store.images[val_rows]), val_meta[list(LABELS)].to_numpy()

    origin = init_origin(params)
    initialized = initialize(p.init, size, params.base.seed)
    model = initialized.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    generator = torch.Generator().manual_seed(params.base.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=p.batch, shuffle=True, generator=generator)
    spec = ModelSpec(size=size, image_size=params.base.image_size,
                     init={**initialized.provenance, "pretrained_on": site, "pretrain_data_version": data_version()})
    state = {"epoch": 0, "best_auroc": float("-inf"), "best_epoch": 0, "history": []}
    if resume and (out / CHECKPOINT).is_dir():
        state = load_checkpoint(out / CHECKPOINT, model, optimizer)
        generator.set_state(torch.tensor(state.pop("generator"), dtype=torch.uint8))
        print(f"pretrain: {size}: resumed after epoch {state['epoch']}", file=sys.stderr)

    # The run opens before the first step, so every epoch can be watched and a failed run leaves its record.
    with stage_run(STAGE):
        mlflow.set_tags({"dp_cxr.pretrain_size": size, "source_site": site, "resumed": str(resume).lower()})
        mlflow.log_params({f"pretrain.{k}": v for k, v in p.model_dump().items() if k != "models"} | {"model": size})
        for epoch in range(state["epoch"] + 1, p.epochs + 1):
            model.train()
            loss_sum = 0.0
            for x, y in tqdm(loader, desc=f"pretrain {size} epoch {epoch}/{p.epochs}", unit="batch", file=sys.stderr,
                             mininterval=1.0):
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
            print(f"pretrain: {size} epoch {epoch}: val mean AUROC {val_auroc:.4f}", file=sys.stderr)
            if val_auroc > state["best_auroc"] or state["best_epoch"] == 0:
                state["best_auroc"], state["best_epoch"] = val_auroc, epoch
                save_model(model, spec, out)
            state["epoch"] = epoch
            save_checkpoint(out / CHECKPOINT, model, optimizer, {**state, "generator": generator.get_state().tolist()})

        best, _ = load_model(out)
        test_rows, test_meta = store.split("test")
        test_scores = predict(best, np.asarray(store.images[test_rows]))
        test_labels = test_meta[list(LABELS)].to_numpy()
        metrics = {"best_epoch": state["best_epoch"], "val_mean_auroc": state["best_auroc"],
                   "test_mean_auroc": mean_auroc(test_labels, test_scores),
                   **{f"test_auroc.{label}": mean_auroc(test_labels[:, [k]], test_scores[:, [k]])
                      for k, label in enumerate(LABELS)}}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "history.json").write_text(json.dumps(state["history"], indent=2))
        (out / SOURCE).write_text(json.dumps(source_manifest(store, site, params.data.sites[site].format,
                                                             data_version(), init=origin)))
        mlflow.log_metrics(metrics)
        tags = {"source_site": site, "source_data_version": data_version(),
                "base_init": spec.init.get("strategy", p.init), "model_size": size, "image_size": spec.image_size,
                "privacy": "none (public data, non-private)",
                **{k: f"{v:.4f}" for k, v in metrics.items() if k.startswith("test_mean")}}
        version = register(out, f"{p.registered_model}-{size}", tags, aliases=[p.alias],
                           extra_artifacts={"source": out / SOURCE})
    print(f"pretrain: {size}: best epoch {state['best_epoch']} (val mean AUROC {state['best_auroc']:.4f}, "
          f"{site} test {metrics['test_mean_auroc']:.4f}) -> {out}, registered {version.name} v{version.version} "
          f"@{p.alias}", file=sys.stderr)
    return {"size": size, **metrics, "registered_model": version.name, "version": version.version}


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
    """``python -m pipelines.pretrain [--resume] [-P pretrain.epochs=4 ...]``."""
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--resume", action="store_true", help="continue each size from its last checkpoint")

    run_stage(STAGE, lambda params, args: pretrain(params, resume=args.resume), argv, flags)


if __name__ == "__main__":
    main()

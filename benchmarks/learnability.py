"""Is the synthetic data set learnable but not trivial, and do external sites show domain shift?

Trains a non-private ``convnext_atto`` from scratch on the private site's train split (the prepared store at
``base.image_size``), picks the epoch with the best val mean AUROC, and prints the mean AUROC on the private
test split and on every external site. Target (issue 2): private test in [0.80, 0.97], at least two external
sites measurably lower. Run after `make data` and `dvc repro prepare`:

    .venv/bin/python benchmarks/learnability.py [--epochs 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import timm
import torch
from sklearn.metrics import roc_auc_score

from pipelines.config import load_params
from pipelines.data.schema import LABELS
from pipelines.data.store import open_site


def mean_auroc(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            scores.append(torch.sigmoid(model(to_tensor(images[start:start + 256]))).numpy())
    scores = np.concatenate(scores)
    return float(np.mean([roc_auc_score(labels[:, k], scores[:, k]) for k in range(labels.shape[1])
                          if 0 < labels[:, k].sum() < len(labels)]))


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(batch, dtype=np.float32)) / 255.0 - 0.5).div(0.5).unsqueeze(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    params = load_params()
    root = Path(params.base.artifacts) / "prepare"
    torch.manual_seed(0)
    private = open_site(root / params.private_site())
    split = {}
    for name in ("train", "val", "test"):
        rows, meta = private.split(name)
        split[name] = (np.asarray(private.images[rows]), meta[list(LABELS)].to_numpy(np.float32))
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=len(LABELS), in_chans=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x_train, y_train = split["train"]
    best, best_state = -1.0, None
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = np.random.default_rng(epoch).permutation(len(x_train))
        for start in range(0, len(order), args.batch):
            rows = order[start:start + args.batch]
            optimizer.zero_grad()
            loss_fn(model(to_tensor(x_train[rows])), torch.from_numpy(y_train[rows])).backward()
            optimizer.step()
        val = mean_auroc(model, *split["val"])
        print(f"epoch {epoch + 1}: val mean AUROC {val:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test = mean_auroc(model, *split["test"])
    print(f"private {params.private_site()} test (n={len(split['test'][0])}): mean AUROC {test:.3f}")
    for name, site in params.data.sites.items():
        if site.role != "external":
            continue
        store = open_site(root / name)
        auroc = mean_auroc(model, np.asarray(store.images), store.metadata[list(LABELS)].to_numpy(np.float32))
        print(f"external {name} (n={len(store.metadata)}): mean AUROC {auroc:.3f} "
              f"(ratio to private {auroc / test:.2f})")


if __name__ == "__main__":
    main()

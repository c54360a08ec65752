"""The pretrain stage's two methods: supervised (``domain``) and self-supervised (``ssl``) on the public source."""

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from models.convnext import create_model
from models.registry import get_version
from pipelines.config import load_params
from pipelines.data.schema import LABELS
from pipelines.data.store import METADATA
from pipelines.pretrain import pretrain
from pipelines.self_supervised import METHODS, SelfSupervised, UnlabeledViews
from pipelines.stage import StageError
from pipelines.train import train
from tests.conftest import PRIVATE

pytestmark = pytest.mark.slow
PUBLIC = "synthetic-mimic-cxr-jpg"
TINY = ["base.image_size=32", "pretrain.models=[micro]", "pretrain.epochs=1", "pretrain.batch=32",
        "pretrain.ssl.epochs=1", "pretrain.ssl.batch=32"]
TRAIN = ["train.model=micro", "train.epochs=1", "train.logical_batch=64", "train.physical_batch=32",
         "train.self_check_images=2", "train.epsilon=8"]


def _only_sites(*names):
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["data"]["sites"] = {name: raw["data"]["sites"][name] for name in names}
    Path("params.yaml").write_text(yaml.safe_dump(raw))


def test_ssl_and_supervised_models_are_probed_registered_and_start_a_private_cell(workspace):
    from pipelines.prepare import prepare

    _only_sites(PRIVATE.name, PUBLIC)
    prepare(load_params(Path("params.yaml"), TINY))
    both = load_params(Path("params.yaml"), [*TINY, "pretrain.methods=[supervised,ssl]"])
    results = {r["method"]: r for r in pretrain(both)}
    assert set(results) == {"supervised", "ssl"}
    for method, folder in (("supervised", "micro"), ("ssl", "ssl-micro")):
        metrics = json.loads((Path("artifacts/pretrain") / folder / "metrics.json").read_text())
        assert metrics["probe_test_mean_auroc"] == results[method]["probe_test_mean_auroc"]
        assert 0 <= metrics["probe_test_mean_auroc"] <= 1 and 0 <= metrics["probe_random_init_test_mean_auroc"] <= 1
        assert metrics["probe_gain_ci_low"] <= metrics["probe_gain"] <= metrics["probe_gain_ci_high"]
        assert (Path("artifacts/pretrain") / folder / "source.json").is_file()
    registered = get_version("dp-cxr-pretrain-ssl-micro", "current")
    assert registered.tags["pretrain_method"] == "ssl" and registered.tags["ssl_method"] == both.pretrain.ssl.method
    assert registered.tags["epochs"] == "1" and registered.tags["source_site"] == PUBLIC
    assert registered.tags["source_data_version"] and "probe_test_mean_auroc" in registered.tags
    assert get_version("dp-cxr-pretrain-micro", "current").tags["pretrain_method"] == "supervised"

    train(load_params(Path("params.yaml"), [*TINY, *TRAIN, "train.init=ssl"]))
    record = json.loads(Path("artifacts/train/ssl-8-micro-1.0-0/privacy.json").read_text())
    assert record["init"]["strategy"] == "ssl" and record["init"]["registered_model"] == "dp-cxr-pretrain-ssl-micro"
    assert record["init"]["overlap.exact_copies"] == "0" and record["init"]["overlap.shared_patients"] == "0"
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.pretrain_method = 'ssl'")
    assert [r.data.metrics["ssl_loss"] for r in runs if r.info.status == "FINISHED"]


def test_ssl_reads_no_label_and_its_model_is_refused_when_the_source_overlaps_the_private_site(private_workspace):
    """A public source that is a copy of the private site with every label column removed: SSL trains on it (it
    reads no label; there is nothing to probe), and the private cell refuses the result."""
    public = Path("artifacts/prepare/public-copy")
    shutil.copytree(Path("artifacts/prepare") / PRIVATE.name, public)
    meta = pd.read_csv(public / METADATA)
    meta.drop(columns=list(LABELS)).to_csv(public / METADATA, index=False)
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["data"]["sites"]["public-copy"] = {"format": "inhouse", "role": "public", "path": "data/public-copy",
                                           "options": {}}
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    own = [*TINY, "pretrain.registered_model=copy-pretrain"]      # this test's registry names alone
    with pytest.raises(StageError, match=r"copy-pretrain-ssl-micro.* \(pretrain.methods must include ssl; then"):
        train(load_params(Path("params.yaml"), [*own, *TRAIN, "train.init=ssl"]))
    with pytest.raises(StageError, match="no label column atelectasis: the supervised method learns its labels"):
        pretrain(load_params(Path("params.yaml"), [*own, "pretrain.methods=[ssl,supervised]"]))
    assert not Path("artifacts/pretrain").exists()
    [result] = pretrain(load_params(Path("params.yaml"), [*own, "pretrain.methods=[ssl]"]))
    assert result["method"] == "ssl" and "probe_test_mean_auroc" not in result
    n = len(meta)
    with pytest.raises(StageError, match=f"shares {n} identical images"):
        train(load_params(Path("params.yaml"), [*own, *TRAIN, "train.init=ssl"]))
    with pytest.raises(StageError, match=f"shares {n} identical images"):
        train(load_params(Path("params.yaml"), [*own, *TRAIN, "train.init=ssl:artifacts/pretrain/ssl-micro"]))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_on_two_views(method):
    """A few steps on the same images lower each method's loss; BYOL's target moves with its momentum."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 32, 32), dtype=torch.uint8).numpy()
    views = UnlabeledViews(images, range(16), 32, 0.5)
    first, second = (torch.stack(v) for v in zip(*(views[i] for i in range(16)), strict=True))
    assert first.shape == (16, 1, 32, 32) and not torch.equal(first, second)
    learner = SelfSupervised(create_model("micro"), method)
    optimizer = torch.optim.AdamW([w for w in learner.parameters() if w.requires_grad], lr=1e-3)
    losses = []
    for step in range(8):
        loss = learner.loss(first, second)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.after_step(step, 8)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    if method == "byol":
        online, target = learner.backbone.stem[0].weight, learner.target_backbone.stem[0].weight
        assert not target.requires_grad and not torch.equal(online, target)

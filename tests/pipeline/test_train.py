"""The train stage on a small synthetic private site: learning, privacy record, patient unit, kill and resume."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.convnext import predict
from models.initialization import initialize
from models.privacy import epsilon_of
from models.weights import load_model
from pipelines.config import load_params
from pipelines.data.datasets import PatientDataset
from pipelines.data.schema import LABELS
from pipelines.data.source import source_manifest
from pipelines.data.store import open_site
from pipelines.metrics import bootstrap_indices, mean_auroc
from pipelines.tracking import cell_run_id, flatten
from pipelines.train import main as train_command
from pipelines.train import train
from tests.conftest import PRIVATE

REPO = Path(__file__).resolve().parents[2]
FAST = ["base.image_size=32", "train.model=micro", "train.epochs=3", "train.logical_batch=64",
        "train.physical_batch=32", "train.self_check_images=2"]


@pytest.fixture
def workspace(private_workspace):
    return private_workspace


def params(*overrides):
    return load_params(Path("params.yaml"), [*FAST, *overrides])


@pytest.mark.slow
def test_a_few_epochs_raise_val_auroc(workspace):
    p = params("train.epsilon=inf", "train.epochs=8", "train.logical_batch=32")
    store = open_site(Path("artifacts/prepare") / PRIVATE.name)
    rows, meta = store.split("val")
    labels = meta[list(LABELS)].to_numpy()
    untrained = mean_auroc(labels, predict(initialize("scratch", "micro", p.train.seed).model, store.images[rows]))
    result = train(p)
    trained, _ = load_model(Path("artifacts/train") / p.train.cell)
    assert result["val_mean_auroc"] == pytest.approx(mean_auroc(labels, predict(trained, store.images[rows])))
    assert result["val_mean_auroc"] > untrained + 0.05


@pytest.mark.slow
def test_private_run_records_its_guarantee(workspace):
    p = params("train.epsilon=8", "train.epochs=2")
    train(p)
    out = Path("artifacts/train") / p.train.cell
    record = json.loads((out / "privacy.json").read_text())
    n = int((open_site(Path("artifacts/prepare") / PRIVATE.name).metadata["split"] == "train").sum())
    assert record["n"] == n and record["unit"] == "image" and record["accountant"] == "prv"
    assert 7.5 < record["epsilon"] <= 8.0 + 0.02          # calibrated to the target over the planned steps
    assert record["epsilon_pld"] - 1e-3 <= record["epsilon"] <= record["epsilon_rdp"]
    assert record["steps"] == sum(1 for _ in (out / "ledger.jsonl").open()) == sum(h[2] for h in record["history"])
    assert record["noise_multiplier"] > 0 and record["sample_rate"] == pytest.approx(1 / math.ceil(n / 64))
    assert record["init"]["strategy"] == "scratch" and record["torch_version"] == torch.__version__
    assert {"data_version", "prepare_digest", "opacus_version", "max_grad_norm", "delta"} <= set(record)
    assert (out / "model.safetensors").is_file() and (out / "spec.json").is_file()
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))

    assert record["noise_seed"] == "secret" and "OS CSPRNG" in record["noise_generator"]

    import mlflow
    run = mlflow.search_runs(experiment_names=["dp-cxr"], filter_string="tags.`dp_cxr.cell` = "
                             f"'{p.train.cell}'", output_format="list")[0]
    client = mlflow.MlflowClient()
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epsilon")][-1] == pytest.approx(
        record["epsilon"], rel=1e-3)
    assert len(client.get_metric_history(run.info.run_id, "val_mean_auroc")) == 2
    assert run.data.params["train.epsilon"] == "8.0"
    # Everything the run releases: nothing computed from the training split but epsilon and the privacy record
    # (val AUROC is the val split's; steps, sigma and q follow from N, the batch and the epochs).
    assert set(run.data.metrics) == {"noise_multiplier", "sample_rate", "val_mean_auroc", "epsilon", "steps",
                                     "final_epsilon", "epsilon_spent", "data_set_epsilon", "best_val_mean_auroc",
                                     "best_epoch"}
    assert set(run.data.params) == set(flatten(p.model_dump()))
    assert {t for t in run.data.tags if not t.startswith("mlflow.")} == {
        "dp_cxr.stage", "dp_cxr.cell", "dp_cxr.run_key", "git_commit", "data_version", "privacy_unit", "resumed",
        "noise_seed",
        "privacy.data_set", "init_strategy", "init_source", "pretrain_run_id", "prepare_digest", "processes", "device"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"privacy.json", "spec.json", "history.json"}
    # The output names its run by key: later stages find this run, not another of the same cell's name.
    assert json.loads((out / "tracking.json").read_text())["run_key"] == run.data.tags["dp_cxr.run_key"]
    assert cell_run_id(p.train.cell, out) == run.info.run_id
    assert {k for row in json.loads((out / "history.json").read_text()) for k in row} == {
        "epoch", "val_mean_auroc", "epsilon", "steps"}


@pytest.mark.slow
def test_the_noise_is_secret_unless_reproducible_is_asked_for(workspace):
    """Two private runs of one cell differ (fresh secret noise and sampling); with train.reproducible they are
    identical, and their record says the seed is public."""
    from safetensors.torch import load_file

    def weights(*overrides):
        p = params("train.epsilon=8", "train.epochs=1", *overrides)
        train(p)
        out = Path("artifacts/train") / p.train.cell
        return load_file(str(out / "model.safetensors")), json.loads((out / "privacy.json").read_text())

    (first, _), (second, _) = weights(), weights()
    assert any(not torch.equal(first[k], second[k]) for k in first)
    (third, record), (fourth, _) = weights("train.reproducible=true"), weights("train.reproducible=true")
    assert all(torch.equal(third[k], fourth[k]) for k in third)
    assert record["noise_seed"] == "public" and "no DP guarantee" in record["noise_generator"]


@pytest.mark.slow
def test_the_book_keeping_engine_trains_like_the_samplers_engine(workspace):
    """The same cell with the same public randomness by both engines: the same sigma, q, steps and epsilon, and
    val AUROCs within each other's bootstrap CI (the engines differ only by float rounding)."""
    store = open_site(Path("artifacts/prepare") / PRIVATE.name)
    rows, meta = store.split("val")
    labels = meta[list(LABELS)].to_numpy()
    results = {}
    for engine in ("samplers", "bk"):
        p = params("train.epsilon=8", "train.reproducible=true", f"train.engine={engine}")
        train(p)
        out = Path("artifacts/train") / p.train.cell
        record = json.loads((out / "privacy.json").read_text())
        assert record["engine"] == engine
        model, _ = load_model(out)
        results[engine] = record, predict(model, store.images[rows])
    (samplers, scores), (bk, bk_scores) = results["samplers"], results["bk"]
    for key in ("noise_multiplier", "sample_rate", "steps", "epsilon", "history"):
        assert bk[key] == samplers[key], key
    resampled = [mean_auroc(labels[i], scores[i]) for i in bootstrap_indices(len(labels), 200, seed=0)]
    low, high = np.nanpercentile(resampled, [2.5, 97.5])
    assert low <= mean_auroc(labels, bk_scores) <= high
    assert mean_auroc(labels, bk_scores) == pytest.approx(mean_auroc(labels, scores), abs=0.02)


def test_delta_must_be_below_one_over_n(workspace):
    from pipelines.stage import StageError
    with pytest.raises(StageError, match=r"train.delta=0.01 is not below 1/N"):
        train(params("train.delta=0.01"))


def test_patient_unit_samples_patients_and_accounts_with_their_number(workspace):
    store = open_site(Path("artifacts/prepare") / PRIVATE.name)
    rows, meta = store.split("train")
    dataset = PatientDataset(store.images, rows, meta[list(LABELS)].to_numpy(np.float32),
                             meta["patient_id"].to_numpy())
    patients = meta["patient_id"].nunique()
    assert len(dataset) == patients < len(rows)          # follow-ups: fewer patients than images
    # Every item of a patient comes from that patient's images.
    images = np.asarray(store.images[rows])
    for index in range(0, len(dataset), 7):
        member_images = images[dataset.members[index]]
        image, _ = dataset[index]
        pixels = np.round((image[0].numpy() * 0.5 + 0.5) * 255).astype(np.uint8)
        assert any(np.array_equal(pixels, m) for m in member_images)
        assert len(set(meta["patient_id"].iloc[dataset.members[index]])) == 1
    # Poisson sampling over patients: a step holds each sampled patient once.
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader
    sampler = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=64)).batch_sampler
    for _, step in zip(range(50), sampler, strict=False):
        assert len(step) == len(set(step))
        step_patients = [meta["patient_id"].iloc[dataset.members[i][0]] for i in step]
        assert len(step_patients) == len(set(step_patients))
    p = params("train.unit=patient", "train.epochs=1")
    train(p)
    record = json.loads((Path("artifacts/train") / p.train.cell / "privacy.json").read_text())
    assert record["unit"] == "patient" and record["n"] == patients


KILLER = """
import os, signal, sys
from pathlib import Path
import models.privacy as privacy
from pipelines.config import load_params
from pipelines.train import main as train_command
from pipelines.train import train

calls = {"n": 0}
record = privacy.StepLedger.record
def record_then_die(self, *args):
    if calls["n"] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)     # a hard kill, mid-epoch, between two steps
    calls["n"] += 1
    record(self, *args)
privacy.StepLedger.record = record_then_die
train(load_params(Path("params.yaml"), sys.argv[2:]))
"""


@pytest.mark.slow
def test_killed_run_resumes_and_counts_every_executed_step(workspace, tmp_path, monkeypatch, capsys):
    """Also the data set's budget ledger: three runs (one killed, one resumed) compose to its total, which deleting
    artifacts/ does not reset, and a run the budget cannot pay for is refused before it writes anything."""
    from models.privacy import StepLedger
    from pipelines.budget import budget_report, composed_epsilon
    from pipelines.stage import StageError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")   # this test's ledger alone
    overrides = [*FAST, "train.epsilon=4", "train.epochs=3"]
    uninterrupted = train(load_params(Path("params.yaml"), overrides))
    steps_per_epoch = uninterrupted["steps"] // 3
    out = Path("artifacts/train") / uninterrupted["cell"]
    shutil.rmtree(out)
    kill_at = steps_per_epoch + steps_per_epoch // 2 + 1          # in the middle of epoch 2
    killed = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), *overrides], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sum(1 for _ in (out / "ledger.jsonl").open()) == kill_at
    assert json.loads((out / "checkpoint" / "state.json").read_text())["epoch"] == 1

    with pytest.raises(SystemExit) as changed:      # the command line, in this process
        train_command(["--resume", *[a for o in [*overrides, "train.max_grad_norm=2.0"] for a in ("-P", o)]])
    assert changed.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1:] == [
        f"train: error: cannot resume {out.name}: max_grad_norm was 1.0 in the checkpointed run and is 2.0 now (a "
        f"guarantee covers one configuration); run without --resume"]
    for change, refusal in [("train.epochs=4", "epochs was 3"), ("train.data_fraction=0.5", "nothing to resume"),
                            ("train.unit=patient", "unit was 'image'"),
                            ("train.epsilon=5", "nothing to resume in artifacts/train/scratch-5-micro-1.0-0")]:
        with pytest.raises(StageError, match=refusal):           # another epsilon or fraction is another cell
            train(load_params(Path("params.yaml"), [*overrides, change]), resume=True)
    # Each ledger line is charged with its own mechanism: make the first epoch's lines noisier than the rest.
    lines = (out / "ledger.jsonl").read_text().splitlines()
    sigma = json.loads(lines[0])["sigma"]
    lines[:steps_per_epoch] = [json.dumps({**json.loads(line), "sigma": 2 * sigma}) for line in lines[:steps_per_epoch]]
    (out / "ledger.jsonl").write_text("\n".join(lines) + "\n")

    train(load_params(Path("params.yaml"), overrides), resume=True)
    record = json.loads((out / "privacy.json").read_text())
    executed = sum(1 for _ in (out / "ledger.jsonl").open())
    assert executed == kill_at + 2 * steps_per_epoch               # epochs 2 and 3 ran in full after the resume
    assert record["steps"] == executed == sum(h[2] for h in record["history"])
    ledger = StepLedger(out / "ledger.jsonl").history()
    assert [tuple(h) for h in record["history"]] == ledger and ledger[0][0] == 2 * sigma and len(ledger) == 2
    assert record["epsilon"] == pytest.approx(epsilon_of(ledger, 1e-5, "prv"), rel=1e-9)
    assert record["epochs"] == 3

    # The data set's ledger: the uninterrupted run, the killed one and the resumed one, all charged.
    q = record["sample_rate"]
    runs = [(sigma, q, 3 * steps_per_epoch), (sigma, q, kill_at), (sigma, q, 2 * steps_per_epoch)]
    [row] = budget_report(params())
    assert row["runs"] == 3 and row["steps"] == kill_at + 5 * steps_per_epoch
    assert row["epsilon_spent"] == pytest.approx(composed_epsilon(runs, 1e-5), rel=1e-9)
    assert record["data_set_epsilon"] == pytest.approx(row["epsilon_spent"], rel=1e-9)
    shutil.rmtree("artifacts/train")                               # deleting the outputs resets nothing
    assert budget_report(params())[0]["epsilon_spent"] == row["epsilon_spent"]
    ledger_file = next(Path(".privacy-ledger").glob("*.jsonl"))
    before = ledger_file.read_text()
    over = params("train.epsilon=4", "train.epochs=3", f"privacy.budget={row['epsilon_spent'] + 1}")
    with pytest.raises(StageError, match=rf"spent epsilon {row['epsilon_spent']:.3f}, this run plans \d\.\d+ more"):
        train(over)
    assert not Path("artifacts/train").exists() and ledger_file.read_text() == before


def _domain_folder(tmp_path, store, format):
    """A pretrained-model folder whose source manifest lists ``store``'s images and patients."""
    from models.weights import ModelSpec, save_model

    folder = tmp_path / "pretrained"
    save_model(initialize("scratch", "micro", 0).model, ModelSpec(size="micro", image_size=32), folder)
    (folder / "source.json").write_text(json.dumps(source_manifest(store, "a-public-source", format, "untracked")))
    return folder


def test_domain_init_refuses_a_source_sharing_images_with_the_private_site(workspace):
    from pipelines.stage import StageError

    store = open_site(Path("artifacts/prepare") / PRIVATE.name)
    folder = _domain_folder(workspace, store, "mimic-cxr-jpg")   # another id space: only content can match
    n = len(store.metadata)
    with pytest.raises(StageError, match=f"shares {n} identical images, {n} near-duplicate images .* and 0 patient"):
        train(params(f"train.init=domain:{folder}", "train.epsilon=8"))
    assert not (Path("artifacts/train") / params(f"train.init=domain:{folder}").train.cell / "privacy.json").exists()


def test_domain_init_refuses_a_source_sharing_patients_with_the_private_site(workspace):
    from pipelines.stage import StageError

    store = open_site(Path("artifacts/prepare") / PRIVATE.name)
    folder = _domain_folder(workspace, store, "inhouse")
    manifest = json.loads((folder / "source.json").read_text())
    manifest["content_hashes"], manifest["signatures"] = [], ""   # other images of the same patients
    (folder / "source.json").write_text(json.dumps(manifest))
    with pytest.raises(StageError, match=f"shares 0 identical images, 0 near-duplicate .* {len(store.metadata)} patient"):
        train(params(f"train.init=domain:{folder}", "train.epsilon=8"))
    (folder / "source.json").unlink()
    with pytest.raises(StageError, match="overlap with the private site cannot be checked"):
        train(params(f"train.init=domain:{folder}", "train.epsilon=8"))


def test_domain_init_refuses_a_source_holding_a_re_encoded_copy_of_a_private_image(workspace, private_store):
    """A private PNG saved as JPEG (quality 90) with its contrast lowered has other bytes and other pixels: only
    the near-duplicate signature can find it in the public source."""
    import io

    from PIL import Image

    from models.preprocessing import decode_bytes
    from pipelines.data.source import signature
    from pipelines.data.store import SiteStore
    from pipelines.stage import StageError

    store = open_site(Path("artifacts/prepare") / PRIVATE.name)
    folder = _domain_folder(workspace, store, "mimic-cxr-jpg")
    original = private_store / store.metadata.at[5, "path"]
    victim = np.asarray(Image.open(original), dtype=np.float32)
    encoded = io.BytesIO()
    Image.fromarray(np.round(victim * 0.92 + 8).astype(np.uint8)).save(encoded, "JPEG", quality=90)
    copy = decode_bytes(encoded.getvalue())
    assert not np.array_equal(copy, decode_bytes(original.read_bytes()))
    public = SiteStore(store.images[:0], store.metadata.iloc[:0], signature(copy)[None])
    (folder / "source.json").write_text(json.dumps(source_manifest(public, "a-public-source", "mimic-cxr-jpg", "x")))
    with pytest.raises(StageError, match="shares 0 identical images, 1 near-duplicate images"):
        train(params(f"train.init=domain:{folder}", "train.epsilon=8"))


@pytest.mark.slow
def test_a_checkpoint_init_must_say_what_data_it_saw(workspace):
    from models.weights import ModelSpec, save_model
    from pipelines.stage import StageError

    folder = workspace / "weights"
    save_model(initialize("scratch", "micro", 0).model, ModelSpec(size="micro", image_size=32), folder)
    with pytest.raises(StageError, match="carries no provenance"):
        train(params(f"train.init=checkpoint:{folder}", "train.epsilon=8"))
    baseline = params("train.epsilon=inf", "train.epochs=1")
    train(baseline)
    trained = Path("artifacts/train") / baseline.train.cell
    with pytest.raises(StageError, match="trained non-privately on this private site"):
        train(params(f"train.init=checkpoint:{trained}", "train.epsilon=8"))
    assert not (Path("artifacts/train") / params(f"train.init=checkpoint:{trained}").train.cell).exists()
    allowed = params(f"train.init=checkpoint:{folder}", "train.epsilon=8", "train.epochs=1",
                     "train.allow_unverified_init=true")
    train(allowed)
    record = json.loads((Path("artifacts/train") / allowed.train.cell / "privacy.json").read_text())
    assert record["init"]["provenance"].startswith("UNVERIFIED")

    # Pretraining from such weights carries what they saw into its source manifest, and training checks it.
    from pipelines.pretrain import init_origin

    with pytest.raises(StageError, match="pretrain.allow_unverified_init"):
        init_origin(params(f"pretrain.init=checkpoint:{folder}"))
    unverified = init_origin(params(f"pretrain.init=checkpoint:{folder}", "pretrain.allow_unverified_init=true"))
    with pytest.raises(StageError, match="was pretrained from .* which carries no provenance"):
        train(params(f"train.init=domain:{_pretrained_from(workspace, 'a', unverified)}", "train.epsilon=8"))
    leaked = _pretrained_from(workspace, "b", init_origin(params(f"pretrain.init=checkpoint:{trained}")))
    with pytest.raises(StageError, match="trained non-privately on this private site"):
        train(params(f"train.init=domain:{leaked}", "train.epsilon=8"))


def _pretrained_from(tmp_path, name, origin):
    """A pretrained-model folder whose (empty) public source started from weights of the given origin."""
    from models.weights import ModelSpec, save_model
    from pipelines.data.store import SiteStore

    store = open_site(Path("artifacts/prepare") / PRIVATE.name)
    folder = tmp_path / f"pretrained-{name}"
    save_model(initialize("scratch", "micro", 0).model, ModelSpec(size="micro", image_size=32), folder)
    public = SiteStore(store.images[:0], store.metadata.iloc[:0], store.signatures[:0])
    (folder / "source.json").write_text(json.dumps(source_manifest(public, "public", "mimic-cxr-jpg", "x", origin)))
    return folder


"""What the registry refuses and what a registered version claims: incomplete privacy records, private aliases on
models without a guarantee, the epsilon of a choice among several private runs, epsilon rounded up."""

import json

import pytest
from safetensors.torch import save_file

from models.privacy import dp_accounting_epsilons
from pipelines.cells import Cell
from pipelines.config import ConfigError, load_params
from pipelines.register import Choice, check_record, choose, refuse_private_aliases, registered_record
from pipelines.stage import StageError

COMPLETE = {"epsilon": 7.99, "delta": 1e-5, "accountant": "prv", "noise_multiplier": 1.1, "sample_rate": 0.1,
            "steps": 42, "max_grad_norm": 1.0, "unit": "image", "n": 1564, "data_version": "abc",
            "noise_seed": "secret", "history": [[1.1, 0.1, 42]]}


def _cell(folder, record, name="scratch-8-atto-1.0-0", val_auroc=0.7):
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(3)}, str(folder / "model.safetensors"))
    (folder / "history.json").write_text(json.dumps([{"epoch": 1, "val_mean_auroc": val_auroc}]))
    params = load_params()
    train = next(t for t in params.grid_cells() if t.cell == name)
    return Cell(name, folder, train, record)


@pytest.mark.parametrize("missing", ["noise_multiplier", "accountant", "steps", "unit", "n", "data_version"])
def test_a_private_model_without_a_complete_privacy_record_is_refused(tmp_path, missing):
    record = {k: v for k, v in COMPLETE.items() if k != missing}
    with pytest.raises(StageError, match=f"incomplete privacy record \\(missing {missing}\\)"):
        check_record(_cell(tmp_path, record))


def test_a_finite_epsilon_without_noise_is_refused(tmp_path):
    with pytest.raises(StageError, match="a noise multiplier, an accountant and steps"):
        check_record(_cell(tmp_path, {**COMPLETE, "noise_multiplier": 0.0}))


def test_private_aliases_never_name_the_non_private_model():
    with pytest.raises(ConfigError, match="reserved for private models"):
        load_params(overrides=["register.aliases={champion: inf}"])
    with pytest.raises(ConfigError, match="reserved by MLflow"):
        load_params(overrides=["register.aliases={latest: 8}"])
    with pytest.raises(ConfigError, match="not in grid.epsilons"):
        load_params(overrides=["register.aliases={champion: 3}"])
    with pytest.raises(ConfigError, match="reserved for private models and cannot name domain-inf-atto-1.0-0"):
        load_params(overrides=["register.select=fixed", "register.fixed={champion: domain-inf-atto-1.0-0}"])


def test_best_of_grid_charges_the_composition_of_every_candidate_and_fixed_the_cell_alone(tmp_path):
    a = _cell(tmp_path / "a", {**COMPLETE, "epsilon": 7.9951, "history": [[0.91, 1 / 7, 42]]}, "scratch-8-atto-1.0-0",
              val_auroc=0.6)
    b = _cell(tmp_path / "b", {**COMPLETE, "epsilon": 7.9951, "history": [[0.91, 1 / 7, 42]]}, "domain-8-atto-1.0-0",
              val_auroc=0.8)
    params = load_params(overrides=["grid.epsilons=[8]", "register.aliases={champion: 8}", "audit.cells=[domain-8-atto-1.0-0]"])
    [chosen] = choose(params, [a, b])
    assert chosen.cell is b and chosen.candidates == [a, b] and chosen.aliases == ["champion"]
    record = registered_record(chosen, 1e-5)
    composed = dp_accounting_epsilons([(0.91, 1 / 7, 42), (0.91, 1 / 7, 42)], 1e-5)["pld"]
    assert composed <= float(record["epsilon"]) <= composed + 0.05 and float(record["epsilon"]) > 10
    assert record["epsilon_cell"] == "7.9951" and record["selection"] == "best-of-grid"
    assert record["candidates"] == "scratch-8-atto-1.0-0, domain-8-atto-1.0-0"
    fixed = load_params(overrides=["register.select=fixed", "register.fixed={champion: domain-8-atto-1.0-0}",
                                   "serve.alias=champion"])
    [only] = choose(fixed, [a, b])
    assert only.cell is b and only.aliases == ["champion"] and only.selection == "fixed"
    assert registered_record(only, 1e-5)["epsilon"] == "7.9951"


def test_epsilon_is_rounded_up_and_the_record_is_bound_to_the_weights(tmp_path):
    import hashlib

    cell = _cell(tmp_path, {**COMPLETE, "epsilon": 7.99941})
    record = registered_record(Choice(cell, [], "fixed", [cell]), 1e-5)
    assert record["epsilon"] == "7.9995"                         # never 7.9994: the served value is not below
    assert record["weights_sha256"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert record["noise_seed"] == "secret"


def test_a_public_seed_model_gets_no_private_alias(tmp_path):
    cell = _cell(tmp_path, {**COMPLETE, "noise_seed": "public"})
    record = registered_record(Choice(cell, ["champion"], "fixed", [cell]), 1e-5)
    with pytest.raises(StageError, match=r"reserved for private models .* train.reproducible: true"):
        refuse_private_aliases(Choice(cell, ["champion"], "fixed", [cell]), record, ["champion"])
    refuse_private_aliases(Choice(cell, ["debug"], "fixed", [cell]), record, ["champion"])     # other aliases may


def test_a_failed_audit_refuses_the_configuration_and_a_passed_one_is_shown(tmp_path):
    from pipelines.register import audit_of, audit_tags

    params = load_params(overrides=[f"base.artifacts={tmp_path}"])
    assert audit_of(params, "domain-8-atto-1.0-0") is None
    folder = tmp_path / "audit" / "domain-8-atto-1.0-0"
    folder.mkdir(parents=True)
    blackbox = {"epsilon_lower": 0.5, "epsilon_lower_fdp": 0.7, "m": 500, "kind": "black-box input canaries"}
    audited = {"passed": False, "epsilon_claimed": 7.9951, "confidence": 0.95, "blackbox": blackbox,
               "whitebox": {"epsilon_lower": 9.31234, "epsilon_lower_fdp": 11.98765, "m": 1000,
                            "kind": "white-box gradient canaries"}}
    (folder / "audit.json").write_text(json.dumps(audited))
    with pytest.raises(StageError, match=r"domain-8-atto-1.0-0: its configuration failed the privacy audit \(epsilon "
                                         r">= 11.988 measured, 7.9951 claimed"):
        audit_of(params, "domain-8-atto-1.0-0")
    (folder / "audit.json").write_text(json.dumps({**audited, "passed": True, "whitebox": {
        **audited["whitebox"], "epsilon_lower": 0.31239, "epsilon_lower_fdp": 0.45671}}))
    audited = audit_of(params, "domain-8-atto-1.0-0")
    assert audit_tags(audited) == {
        "audit.confidence": "0.95", "audit.epsilon_lower.whitebox": "0.3123", "audit.epsilon_lower_fdp.whitebox":
        "0.4567", "audit.canaries.whitebox": "1000", "audit.epsilon_lower.blackbox": "0.5000",
        "audit.epsilon_lower_fdp.blackbox": "0.7000", "audit.canaries.blackbox": "500"}
    cell = _cell(tmp_path / "a", {**COMPLETE, "epsilon": 7.9951, "history": [[0.91, 1 / 7, 42]]})
    [chosen] = choose(load_params(overrides=["grid.epsilons=[8]", "register.aliases={champion: 8}",
                                             "audit.cells=[domain-8-atto-1.0-0]"]), [cell])
    record = registered_record(chosen, 1e-5, audited)
    assert record["audit"].startswith("audited at 95% confidence against a proven epsilon <= 7.9951: white-box "
                                      "gradient canaries, m = 1000: epsilon >= 0.3123 (one-run), >= 0.4567 (f-DP); "
                                      "black-box input canaries, m = 500: epsilon >= 0.5000 (one-run)")
    assert registered_record(chosen, 1e-5)["audit"].startswith("not audited")

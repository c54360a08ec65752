from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_params

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repository_params_load_with_one_private_site():
    params = load_params(REPO_PARAMS)
    assert params.base.image_size == 64
    assert params.private_site() == "synthetic-uka-cxr-inhouse"
    assert params.data.sites["synthetic-vindr-cxr"].options == {"aggregation": "majority"}


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, lambda raw: raw["prepare"].update(wokers=3))
    with pytest.raises(ConfigError, match=r"^unknown key prepare\.wokers in .*params.yaml \(did you mean workers\?\)$"):
        load_params(path)
    path = write(tmp_path, lambda raw: raw["data"]["sites"]["synthetic-padchest"].update(rol="external"))
    with pytest.raises(ConfigError, match=r"^unknown key data\.sites\.synthetic-padchest\.rol in"):
        load_params(path)


def test_missing_key_is_named(tmp_path):
    path = write(tmp_path, lambda raw: raw["base"].pop("seed"))
    with pytest.raises(ConfigError, match=r"lacks base\.seed"):
        load_params(path)


def test_wrong_type_and_literal_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^base\.image_size: Input should be a valid integer \(got 'big'\)$"):
        load_params(write(tmp_path, lambda raw: raw["base"].update(image_size="big")))
    with pytest.raises(ConfigError, match=r"^data\.uncertain: Input should be 'negative' or 'positive' \(got 'maybe'\)"):
        load_params(write(tmp_path, lambda raw: raw["data"].update(uncertain="maybe")))
    with pytest.raises(ConfigError, match=r"^train\.physical_batch: Input should be greater than 0"):
        load_params(write(tmp_path, lambda raw: raw["train"].update(physical_batch=0)))
    with pytest.raises(ConfigError, match=r"^train\.augment: Input should be a valid boolean"):
        load_params(write(tmp_path, lambda raw: raw["train"].update(augment="yes")))


def test_overrides_are_parsed_as_yaml_and_checked():
    params = load_params(REPO_PARAMS, ["prepare.workers=1", "data.frontal_only=false"])
    assert params.prepare.workers == 1 and params.data.frontal_only is False
    with pytest.raises(ConfigError, match="unknown key"):
        load_params(REPO_PARAMS, ["prepare.nope=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_params(REPO_PARAMS, ["prepare.workers"])


def test_exactly_one_private_site(tmp_path):
    def two_private(raw):
        raw["data"]["sites"]["synthetic-chexpert"]["role"] = "private"

    with pytest.raises(ConfigError, match="exactly one site with role private"):
        load_params(write(tmp_path, two_private))


def test_numbers_written_as_yaml_strings_are_numbers():
    params = load_params(REPO_PARAMS, ["train.lr=3e-3", "train.epsilon=inf", "grid.epsilons=[1, 8, inf]"])
    assert params.train.lr == 0.003 and params.train.epsilon == float("inf")
    assert params.grid.epsilons == [1.0, 8.0, float("inf")]


def test_grid_values_must_be_spelled_as_they_name_the_cells():
    """DVC names a matrix stage by the values as written: 8.0 and 8 would be two names for one cell."""
    with pytest.raises(ConfigError, match=r"^grid\.epsilons: write 8\.0 as 8: grid values name the cells"):
        load_params(REPO_PARAMS, ["grid.epsilons=[1, 8.0, inf]"])
    with pytest.raises(ConfigError, match=r"^grid\.data_fractions: write 1 as 1\.0"):
        load_params(REPO_PARAMS, ["grid.data_fractions=[0.5, 1]"])
    cells = [t.cell for t in load_params(REPO_PARAMS, ["grid.data_fractions=[0.25, 1.0]"]).grid_cells()]
    assert "domain-inf-atto-0.25-0" in cells and "scratch-1-atto-1.0-0" in cells and len(cells) == len(set(cells)) == 18


def test_the_config_is_frozen():
    params = load_params(REPO_PARAMS)
    with pytest.raises(ValueError, match="frozen"):
        params.train.epsilon = 3.0



def test_each_pretraining_method_once():
    with pytest.raises(ConfigError, match=r"^pretrain\.methods: each method once"):
        load_params(REPO_PARAMS, ["pretrain.methods=[ssl, ssl, supervised]"])
    both = load_params(REPO_PARAMS, ["grid.inits=[scratch, ssl, domain]", "pretrain.methods=[supervised, ssl]"])
    assert [t.cell for t in both.grid_cells()][3:6] == ["ssl-1-atto-1.0-0", "ssl-8-atto-1.0-0", "ssl-inf-atto-1.0-0"]

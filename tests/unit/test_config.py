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
    with pytest.raises(ConfigError, match=r"unknown key prepare\.wokers"):
        load_params(path)


def test_missing_key_is_named(tmp_path):
    path = write(tmp_path, lambda raw: raw["base"].pop("seed"))
    with pytest.raises(ConfigError, match=r"lacks base\.seed"):
        load_params(path)


def test_wrong_type_and_literal_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"base\.image_size must be int"):
        load_params(write(tmp_path, lambda raw: raw["base"].update(image_size="big")))
    with pytest.raises(ConfigError, match=r"data\.uncertain is 'maybe'"):
        load_params(write(tmp_path, lambda raw: raw["data"].update(uncertain="maybe")))


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

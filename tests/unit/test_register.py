"""What the registry refuses: incomplete privacy records, and private aliases on the non-private model."""

import pytest

from pipelines.cells import Cell
from pipelines.config import ConfigError, load_params
from pipelines.register import version_tags
from pipelines.stage import StageError

COMPLETE = {"epsilon": 7.99, "delta": 1e-5, "accountant": "prv", "noise_multiplier": 1.1, "sample_rate": 0.1,
            "steps": 42, "max_grad_norm": 1.0, "unit": "image", "n": 1564, "data_version": "abc"}


def _cell(tmp_path, record):
    return Cell("scratch-8-atto-1.0-0", tmp_path, load_params().train, record)


@pytest.mark.parametrize("missing", ["noise_multiplier", "accountant", "steps", "unit", "n", "data_version"])
def test_a_private_model_without_a_complete_privacy_record_is_refused(tmp_path, missing):
    record = {k: v for k, v in COMPLETE.items() if k != missing}
    with pytest.raises(StageError, match=f"incomplete privacy record \\(missing {missing}\\)"):
        version_tags(_cell(tmp_path, record), load_params(), None, None, {})


def test_a_finite_epsilon_without_noise_is_refused(tmp_path):
    with pytest.raises(StageError, match="a noise multiplier, an accountant and steps"):
        version_tags(_cell(tmp_path, {**COMPLETE, "noise_multiplier": 0.0}), load_params(), None, None, {})


def test_private_aliases_never_name_the_non_private_model():
    with pytest.raises(ConfigError, match="reserved for private models"):
        load_params(overrides=["register.aliases={champion: inf}"])
    with pytest.raises(ConfigError, match="reserved by MLflow"):
        load_params(overrides=["register.aliases={latest: 8}"])
    with pytest.raises(ConfigError, match="not in grid.epsilons"):
        load_params(overrides=["register.aliases={champion: 3}"])

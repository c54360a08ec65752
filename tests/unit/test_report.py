"""The report's headline table: what `make demo` copies into the README."""

import math

import pandas as pd

from pipelines.report import _init_comparisons, _results_table

PRIVATE = "site-a"


def test_the_headline_table_shows_the_paired_comparisons_with_resolvable_p_values():
    rows = pd.DataFrame([{"cell": f"{init}-{eps:g}-atto-1.0-0", "init": init, "epsilon": eps, "site": PRIVATE,
                          "value": v, "ci_low": v - 0.02, "ci_high": v + 0.02, "epsilon_spent": spent}
                         for init, eps, v, spent in [("scratch", 8, 0.70, 7.9912), ("ssl", 8, 0.76, 7.9912),
                                                     ("scratch", math.inf, 0.72, math.inf),
                                                     ("ssl", math.inf, 0.80, math.inf)]])
    comparisons = pd.DataFrame([
        {"question": "ssl better than scratch", "site": PRIVATE, "better": "ssl-8-atto-1.0-0",
         "worse": "scratch-8-atto-1.0-0", "epsilon": 8.0, "difference": 0.0601, "p_value": 0.0},
        {"question": "ssl better than scratch", "site": PRIVATE, "better": "ssl-inf-atto-1.0-0",
         "worse": "scratch-inf-atto-1.0-0", "epsilon": math.inf, "difference": 0.08, "p_value": 0.0123},
        {"question": "ssl better than scratch", "site": "site-b", "better": "ssl-8-atto-1.0-0",
         "worse": "scratch-8-atto-1.0-0", "epsilon": 8.0, "difference": -0.5, "p_value": 1.0}])
    compared = _init_comparisons(rows, comparisons, PRIVATE, resamples=1000)
    assert compared.to_dict("records") == [
        {"comparison": "ssl better than scratch", "target ε": "ε=8", "difference": 0.06, "p": "< 0.001"},
        {"comparison": "ssl better than scratch", "target ε": "non-private", "difference": 0.08, "p": "0.012"}]
    records = {c: {"epsilon": e, "delta": 1e-6, "data_set_epsilon": 11.0001} for c, e in
               zip(rows["cell"], ["7.9912", "7.9912", "inf", "inf"], strict=True)}
    text = _results_table(rows, compared, PRIVATE, records, 11.0001)
    assert "δ = 1e-06; ε spent ε=8: 7.992; every private run on this data set so far composes to ε = 11.001" in text
    assert "| ssl     | 0.760 [0.740, 0.780] | 0.800 [0.780, 0.820] |" in text
    assert "| ssl better than scratch | ε=8         |         0.06 | < 0.001 |" in text

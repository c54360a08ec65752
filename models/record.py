"""The privacy record a registered model carries: its fields, the statement it makes, and its binding to the weights.

The register stage writes ``privacy.json`` beside the weights of every registered version (with the SHA-256 of the
weights file); the model import and the service read it back, verify the weights against it, and serve exactly it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

PRIVACY_FIELDS = ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "max_grad_norm",
                  "unit", "n", "data_version")
RECORD_FIELDS = (*PRIVACY_FIELDS, "epsilon_cell", "epsilon_pld", "epsilon_rdp", "epochs", "noise_seed",
                 "noise_generator", "opacus_version", "prepare_digest", "data_set", "data_set_epsilon", "selection",
                 "candidates", "weights_sha256", "audit")
RECORD = "privacy.json"
WEIGHTS_FILE = "model.safetensors"


class WeightsMismatch(ValueError):
    """The weights are not the ones the privacy record was issued for."""


def weights_digest(folder: Path) -> str:
    """SHA-256 of a model folder's weights file."""
    return hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()


def verified_record(folder: Path) -> dict[str, str]:
    """The privacy record of a model folder, once its weights are known to be the ones it was issued for.

    Raises:
        WeightsMismatch: no record, or the weights' SHA-256 differs from the record's.
    """
    if not (folder / RECORD).is_file():
        raise WeightsMismatch(f"{folder} has no {RECORD}: a model without its privacy record is not served; "
                              f"register it with this version's register stage and import it again")
    record = json.loads((folder / RECORD).read_text())
    actual = weights_digest(folder)
    if record.get("weights_sha256") != actual:
        raise WeightsMismatch(f"the weights in {folder} (SHA-256 {actual[:16]}…) are not the ones the privacy record "
                              f"was issued for ({str(record.get('weights_sha256'))[:16]}…): refusing to serve them")
    return record


def epsilon_up(epsilon: object, decimals: int) -> str:
    """Epsilon shortened to ``decimals`` places, rounded up: a printed epsilon never looks smaller than the spent."""
    scale = 10 ** decimals
    return f"{math.ceil(float(epsilon) * scale) / scale:.{decimals}f}"


def privacy_statement(record: dict[str, str]) -> dict[str, str]:
    """The guarantee in words, with the fields TF Privacy's DP-SGD privacy statement and NIST SP 800-226 ask for."""
    unit, private = record["unit"], record["epsilon"] != "inf"
    public_seed = record["noise_seed"] != "secret"
    return {
        "unit": f"one {unit} (add/remove neighbouring relation: two training sets differ by one {unit})",
        "guarantee": (f"(epsilon = {record['epsilon']}, delta = {record['delta']})-DP for one {unit}"
                      + (" ONLY against adversaries who do not know train.seed: trained with a public noise seed, "
                         "it has NO DP guarantee against anyone who knows it" if public_seed else "")
                      if private else "none: the non-private baseline (epsilon = inf)"),
        "accounting": (f"{record['accountant'].upper()} accountant over {record['steps']} Poisson-subsampled Gaussian "
                       f"steps (sigma {record['noise_multiplier']}, q {record['sample_rate']}, "
                       f"C {record['max_grad_norm']}); "
                       f"cross-check dp_accounting PLD {record['epsilon_pld']}, RDP {record['epsilon_rdp']}"
                       if private else "none"),
        "selection": (f"{record['selection']}: chosen among {record['candidates']}; epsilon covers the choice "
                      f"(PLD composition of every candidate), this cell alone {record['epsilon_cell']}"
                      if record["selection"] == "best-of-grid" else
                      f"fixed in the configuration (no data-dependent choice): {record['candidates']}"),
        "data_set_total": (f"every private run recorded on this data set ({record['data_set']}) composes to epsilon "
                           f"{record['data_set_epsilon']} at delta {record['delta']}"),
        "protected": "every intermediate model and checkpoint of the private training run, not only the final weights",
        "not_protected": ("the private val split (chose the epoch and the thresholds), the test split (measured the "
                          "model), the public pretraining data, and the site's metadata used to prepare the data"),
        "audit": record["audit"],
        "randomness": record["noise_generator"],
        "caveats": ("floating-point Gaussian sampling (torch.normal) is not the exact mechanism of the proof "
                    "(Mironov 2012-type attacks are out of scope); side channels of the training machine; group "
                    f"privacy: k {unit}s of one person are protected at k*epsilon"),
    }

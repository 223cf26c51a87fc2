"""Which labeled images validate the models of one studies folder, chosen once and kept.

A train task publishes a model only when its validation Dice is not below the served model's on
the same images, so the validation images must not move between runs: they are recorded in
`<state>/validation_split.json`. A newly labeled image joins validation while fewer than a fifth
of the labeled images (at least one) validate, chosen in a fixed, id-hashed order; otherwise it
trains. An image that validated stays in validation. With a single labeled image there is nothing
to hold out: it trains and validates (the stats say so).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from fasttextdiff.utils.atomic import atomic_write_json

logger = logging.getLogger(__name__)
SPLIT_FILE = "validation_split.json"
VAL_FRACTION = 0.2


def _order(image_id: str) -> str:
    return hashlib.sha256(image_id.encode("utf-8")).hexdigest()


def read_split(state: str | Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(state) / SPLIT_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def split_labeled(labeled_ids: list[str], state: str | Path, persist: bool = True) -> tuple[list[str], list[str],
                                                                                            bool]:
    """(training ids, validation ids, held_out) for the labeled images now; `held_out` is False when
    the only labeled image both trains and validates. The validation ids are recorded in `state`."""
    labeled = sorted(set(labeled_ids))
    if len(labeled) < 2:
        return labeled, labeled, False
    recorded = read_split(state)
    val = [i for i in recorded.get("val", []) if i in labeled]
    wanted = max(1, round(VAL_FRACTION * len(labeled)))
    for image_id in sorted((i for i in labeled if i not in val), key=_order):
        if len(val) >= wanted:
            break
        val.append(image_id)
    if len(val) >= len(labeled):  # always keep one image to train on
        val = val[: len(labeled) - 1]
    val = sorted(val)
    if persist and val != sorted(recorded.get("val", [])):
        keep = sorted(set(val) | {i for i in recorded.get("val", []) if i not in labeled})  # unlabeled for now: kept
        atomic_write_json(Path(state) / SPLIT_FILE, {"val": keep, "rule": f"{VAL_FRACTION:.0%} of the labeled images "
                                                     "(at least one), chosen once and kept"})
        logger.info("validation images: %s", val)
    return [i for i in labeled if i not in val], val, True

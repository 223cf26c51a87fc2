"""Strategy `uncertainty`: offer the unlabeled image the current model is least sure about.

Reads the scores the `fasttextdiff_uncertainty` scoring method (or an earlier infer with the
stored report) left in the image info; it never runs the model itself, so `/activelearning`
answers at once. Scores of the current model are preferred; if none is current yet (just after a
new model was published) the latest stale scores decide; with no score at all it falls back to
the first unlabeled image and says so (`"fallback": "first"`). MONAI Label starts scoring in the
background after every `next_sample`, so the scores catch up.
"""

from __future__ import annotations

import logging
from typing import Any, Dict

from monailabel.interfaces.tasks.strategy import Strategy

from lib.model_manager import ModelManager
from lib.scoring.uncertainty import scored_candidates

logger = logging.getLogger(__name__)


class UncertaintyStrategy(Strategy):
    def __init__(self, manager: ModelManager):
        super().__init__("FastTextDiff: the unlabeled image with the highest report-conditioned uncertainty")
        self.manager = manager

    def __call__(self, request: Dict[str, Any], datastore: Any) -> Dict[str, Any] | None:
        images, current, stale = scored_candidates(datastore, self.manager.paths.model_identity())
        if not images:
            return None
        pool = current or stale
        if not pool:
            logger.info("uncertainty strategy: no scores yet; offering the first unlabeled image")
            return {"id": images[0], "fallback": "first"}
        image_id, score, _ = max(pool, key=lambda c: (c[1], c[0]))
        logger.info("uncertainty strategy: %s (score %.5f, %s, %d candidates)", image_id, score,
                    "current" if current else "stale", len(pool))
        return {"id": image_id, "uncertainty": score, "score_current": bool(current)}

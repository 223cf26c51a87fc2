"""Strategy `report_mismatch`: offer the unlabeled image whose predicted mask contradicts its report most.

Why: a model can be confidently wrong (low spread over noise draws) and the report says so: it names
two infected areas in the upper left and lower right lung and the mask shows one blob in the middle.
The `fasttextdiff_uncertainty` scoring method keeps, beside each image's uncertainty, `report_mismatch`
(`fasttextdiff.text.findings`: count and places of the findings the report names against the
components of the mask, 0 = they agree, 1 = they do not). This strategy ranks the unlabeled images by
both and offers the best rank sum: ranks (as fractions of the pool, ties averaged) rather than raw
values, because the two scores live on unrelated scales. An image whose report names no findings has
no mismatch; it competes on its uncertainty rank alone, so the strategy still works on reports that
name nothing (it then is `uncertainty`). Ties go to the higher uncertainty, then the lower id.

Like `uncertainty` it never runs the model: it reads the scores (current ones preferred, else the
latest stale ones), and with none at all it falls back to the first unlabeled image.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Sequence

from monailabel.interfaces.tasks.strategy import Strategy

from lib.model_manager import ModelManager
from lib.scoring.uncertainty import scored_candidates

logger = logging.getLogger(__name__)


def rank_fractions(values: Sequence[float]) -> list[float]:
    """Each value's rank among `values` as a fraction in (0, 1] (1 = the largest), ties averaged."""
    from scipy.stats import rankdata

    if not values:
        return []
    return [float(r) / len(values) for r in rankdata(values, method="average")]


def rank_sum_choice(candidates: Sequence[tuple[str, float, float | None]]) -> tuple[str, float]:
    """(image id, combined rank) of the best candidate among (id, uncertainty, mismatch or None)."""
    uncertainty = dict(zip((c[0] for c in candidates), rank_fractions([c[1] for c in candidates])))
    with_mismatch = [c for c in candidates if c[2] is not None]
    mismatch = dict(zip((c[0] for c in with_mismatch), rank_fractions([float(c[2]) for c in with_mismatch])))
    combined = []
    for image_id, unc, _ in candidates:
        ranks = [uncertainty[image_id]] + ([mismatch[image_id]] if image_id in mismatch else [])
        combined.append((sum(ranks) / len(ranks), unc, image_id))
    best = min(combined, key=lambda c: (-c[0], -c[1], c[2]))  # highest rank sum, then uncertainty, then lowest id
    return best[2], best[0]


class ReportMismatchStrategy(Strategy):
    def __init__(self, manager: ModelManager):
        super().__init__("FastTextDiff: the unlabeled image whose mask disagrees most with its report "
                         "(rank sum with the uncertainty)")
        self.manager = manager

    def __call__(self, request: Dict[str, Any], datastore: Any) -> Dict[str, Any] | None:
        images, current, stale = scored_candidates(datastore, self.manager.paths.model_identity())
        if not images:
            return None
        pool = current or stale
        if not pool:
            logger.info("report_mismatch strategy: no scores yet; offering the first unlabeled image")
            return {"id": images[0], "fallback": "first"}
        image_id, combined = rank_sum_choice(pool)
        _, uncertainty, mismatch = next(c for c in pool if c[0] == image_id)
        logger.info("report_mismatch strategy: %s (rank sum %.3f, mismatch %s, uncertainty %.5f, %s, %d candidates)",
                    image_id, combined, "none" if mismatch is None else f"{mismatch:.3f}", uncertainty,
                    "current" if current else "stale", len(pool))
        return {"id": image_id, "report_mismatch": mismatch, "uncertainty": uncertainty, "rank_sum": combined,
                "score_current": bool(current)}

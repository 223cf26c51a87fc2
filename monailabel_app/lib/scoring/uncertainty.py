"""Scoring `fasttextdiff_uncertainty`: each unlabeled image's model uncertainty, WITH its report.

MONAI Label's epistemic scoring calls infer without the report, which measures a different
model than the one users get. This method segments each unlabeled image with its stored text and
keeps the mean uncertainty in the image info (`fasttextdiff_uncertainty`: score, model identity,
text hash), and from the same segmentation how far the mask disagrees with the report
(`report_mismatch`, `fasttextdiff.text.findings`; strategy `report_mismatch`). It is incremental:
an image whose score was made by the current model from the current text is skipped (a labeled
image is not scored at all), so scoring after every saved label costs only the new work.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict

from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.infers.fasttextdiff import SCORE_KEY, score_entry, text_sha
from lib.model_manager import ModelManager
from lib.validation import check_int

logger = logging.getLogger(__name__)


def score_is_current(info: Dict[str, Any], identity: str | None) -> bool:
    entry = info.get(SCORE_KEY)
    return bool(isinstance(entry, dict) and identity and entry.get("model") == identity
                and entry.get("text_sha") == text_sha(str(info.get("text") or "")))


def scored_candidates(datastore: Any, identity: str | None) -> tuple[list[str], list[tuple], list[tuple]]:
    """(unlabeled ids, current, stale): each scored unlabeled image as (id, uncertainty, report mismatch or
    None), split by whether its score came from the current model and report. The strategies' one read."""
    images = sorted(datastore.get_unlabeled_images())
    current, stale = [], []
    for image_id in images:
        info = datastore.get_image_info(image_id)
        entry = info.get(SCORE_KEY)
        if not isinstance(entry, dict) or not isinstance(entry.get("score"), (int, float)):
            continue
        mismatch = entry.get("report_mismatch")
        mismatch = float(mismatch) if isinstance(mismatch, (int, float)) else None
        (current if score_is_current(info, identity) else stale).append((image_id, float(entry["score"]), mismatch))
    return images, current, stale


def stale_images(datastore: Any, identity: str | None) -> list[str]:
    return sorted(i for i in datastore.get_unlabeled_images() if not score_is_current(datastore.get_image_info(i),
                                                                                      identity))


def _detail(res: Dict[str, Any], total_unlabeled: int) -> str:
    """One sentence for the client: what this run did (an empty `scores` is not an error)."""
    if not total_unlabeled:
        return "every image has a final label: there is nothing to score"
    parts = [f"scored {res['scored']} of {total_unlabeled} unlabeled image(s)"]
    if res["skipped"]:
        parts.append(f"{res['skipped']} already had a current score (same model, same report)")
    if res["failed"]:
        parts.append(f"{len(res['failed'])} could not be read (see 'failed')")
    return "; ".join(parts) + "; the scores are in each image's info under 'fasttextdiff_uncertainty'"


class ReportUncertaintyScoring(ScoringMethod):
    """Writes a per-image uncertainty score for every unlabeled image whose score is stale."""

    def __init__(self, manager: ModelManager, n_noise: int):
        super().__init__("FastTextDiff: uncertainty of each unlabeled image, computed with its report")
        self.manager = manager
        self.n_noise = n_noise

    def __call__(self, request: Dict[str, Any], datastore: Any) -> Dict[str, Any]:
        from fasttextdiff.data.io import read_image

        started = time.time()
        if not self.manager.ready:
            return {"scored": 0, "skipped": 0, "reason": self.manager.refresh_status().get("message")}
        n_noise = check_int(request.get("n_noise", self.n_noise), "n_noise", 2, 32)
        limit = check_int(request.get("max_images", 0), "max_images", 0, 10**6)
        segmenter, identity = self.manager.segmenter()
        todo = stale_images(datastore, identity)
        total_unlabeled = len(datastore.get_unlabeled_images())
        if limit:
            todo = todo[:limit]
        scored: Dict[str, float] = {}
        failed: Dict[str, str] = {}
        for n, image_id in enumerate(todo, start=1):
            info = datastore.get_image_info(image_id)
            text = str(info.get("text") or "")
            try:
                result = segmenter.segment(read_image(datastore.get_image_uri(image_id)), text, n_noise=n_noise)
            except Exception as exc:  # noqa: BLE001 - one unreadable image must not stop the rest
                failed[image_id] = f"{type(exc).__name__}: {exc}"
                logger.warning("scoring %s failed: %s", image_id, failed[image_id])
                continue
            entry = score_entry(result, text, identity, n_noise)
            score = float(entry["score"])
            if hasattr(datastore, "update_image_info_internal"):
                datastore.update_image_info_internal(image_id, {SCORE_KEY: entry})
            else:
                datastore.update_image_info(image_id, {SCORE_KEY: entry})
            scored[image_id] = score
            if n % 10 == 0 or n == len(todo):
                logger.info("uncertainty scoring: %d / %d images", n, len(todo))
        res = {"scored": len(scored), "skipped": total_unlabeled - len(todo), "failed": failed, "model": identity,
               "scores": scored, "seconds": round(time.time() - started, 2)}
        res["detail"] = _detail(res, total_unlabeled)
        logger.info("uncertainty scoring: %d scored, %d already current, %d failed in %.1fs",
                    res["scored"], res["skipped"], len(failed), res["seconds"])
        return res

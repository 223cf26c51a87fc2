"""Strategy `random`: MONAI Label's, preferring images not handed out recently, without its crash.

MONAI Label weights each unlabeled image by the seconds since the strategy last handed it out;
when every unlabeled image was handed out within the current second, all weights are 0 and
`random.choices` raises (an HTTP 500 for a client that asks quickly). One second more on every
weight keeps the preference and can never sum to zero.
"""

from __future__ import annotations

import random
import time
from typing import Any, Dict

from monailabel.tasks.activelearning.random import Random


class LeastRecentRandom(Random):
    def __call__(self, request: Dict[str, Any], datastore: Any):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request["strategy"]
        now = int(time.time())
        weights = []
        for image in images:
            handed_out = datastore.get_image_info(image).get("strategy", {}).get(strategy, {}).get("ts", 0)
            weights.append(max(0, now - int(handed_out or 0)) + 1)
        index = random.choices(range(len(images)), weights=weights)[0]
        return {"id": images[index], "weight": weights[index]}

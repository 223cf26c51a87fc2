"""Batch inference (`/batch/infer/fasttextdiff`): every chosen datastore image with its stored report.

MONAI Label's BatchInferTask does the looping and saves each result as a label (tag `original`
by default); this subclass refuses unknown models and tags that hold a person's labels (`final`,
in any case: predictions would replace them) up front, keeps one worker on CPU (threads would only
fight over the same cores) and logs progress as `k / n`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict

from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferTask

from lib.validation import bad_request, check_machine_tag

logger = logging.getLogger(__name__)


class FastTextDiffBatchInfer(BatchInferTask):
    def __init__(self, models: Callable[[], Dict[str, Any]]):
        self._models = models

    def __call__(self, request: Dict[str, Any], datastore: Any, infer: Callable) -> Dict[str, Any]:
        import torch

        model = request.get("model")
        if model not in self._models():
            raise bad_request(404, f"unknown model {str(model)[:40]!r}; available: {sorted(self._models())}")
        request = dict(request)
        request["label_tag"] = check_machine_tag(request.get("label_tag") or DefaultLabelTag.ORIGINAL.value)
        request.pop("text", None)  # each image uses its own stored report
        if not torch.cuda.is_available():
            request["max_workers"] = 1
            request["multi_gpu"] = False
            request["device"] = "cpu"
        images = self.get_images(request, datastore)
        logger.info("batch infer %s on %d images (label tag %s)", model, len(images), request["label_tag"])
        result = super().__call__(request, datastore, infer)
        done = sum(1 for r in result.values() if r)
        logger.info("batch infer finished: %d / %d images labeled", done, len(result))
        return result

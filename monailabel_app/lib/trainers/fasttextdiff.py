"""Train task `fasttextdiff`: fusion + head on the labeled images with their reports.

The backbone and the text encoder stay frozen (the label-efficient part of the method); the
reports come from the datastore's image info `text` (MONAI Label's datalist has no image info).
Training continues from the served model and publishes only when the validation Dice does not get
worse (see `lib.training.train_segmenter_from_datastore`).
"""

from __future__ import annotations

from typing import Any, Dict

from lib.trainers.base import FastTextDiffTrainTask
from lib.validation import bad_request


class FastTextDiffTrain(FastTextDiffTrainTask):
    name = "fasttextdiff"

    def __init__(self, conf, paths):
        super().__init__(conf, paths, "FastTextDiff: train cross-modal fusion + head on labeled images and reports")

    def default_epochs(self) -> int:
        return self.conf.epochs

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "lr": self.conf.lr}

    def pre_process(self, request: Dict[str, Any], datastore) -> Dict[str, Any]:
        try:
            lr = float(request.get("lr", self.conf.lr))
        except (TypeError, ValueError):
            raise bad_request(400, f"lr must be a number, got {str(request.get('lr'))[:40]!r}") from None
        if not 0 < lr < 1:
            raise bad_request(400, f"lr must be in (0, 1), got {lr}")
        if not datastore.get_labeled_images():
            raise bad_request(409, "no image has a final label yet: save at least one label, then train")
        return {"lr": lr}

    def refusal(self, datastore, model_state: str) -> str | None:
        reason = super().refusal(datastore, model_state)
        if reason:
            return reason
        if not datastore.get_labeled_images():
            return ("no image has a final label yet: save at least one label (PUT /datastore/label?tag=final), "
                    "then train")
        if self.paths.backbone_dir() is None:
            return ("no diffusion backbone yet: run POST /train/backbone first (it needs no labels and trains the "
                    "segmenter too), or pass --conf backbone_dir DIR")
        return None

    def run(self, datastore: Any, options: Dict[str, Any], log) -> Dict[str, Any]:
        from lib.training import train_segmenter_from_datastore

        return train_segmenter_from_datastore(datastore, self.conf, self.paths, log=log, **options)

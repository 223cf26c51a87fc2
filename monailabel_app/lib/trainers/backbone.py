"""Train task `backbone`: denoising pretraining of the diffusion U-Net on ALL datastore images.

Labels are not needed: this is where the many unlabeled images of a MONAI Label datastore teach
the frozen feature extractor the user's own domain. The next `fasttextdiff` run uses it.
"""

from __future__ import annotations

from typing import Any, Dict

from lib.trainers.base import FastTextDiffTrainTask
from lib.validation import bad_request


class BackbonePretrain(FastTextDiffTrainTask):
    name = "backbone"

    def __init__(self, conf, paths):
        super().__init__(conf, paths, "FastTextDiff: pretrain the diffusion backbone on all images (no labels needed)")

    def default_epochs(self) -> int:
        return self.conf.backbone_epochs

    def pre_process(self, request: Dict[str, Any], datastore) -> Dict[str, Any]:
        if not datastore.list_images():
            raise bad_request(409, "the datastore has no images to pretrain on")
        return {}

    def run(self, datastore: Any, options: Dict[str, Any], log) -> Dict[str, Any]:
        from lib.training import pretrain_backbone_from_datastore

        return pretrain_backbone_from_datastore(datastore, self.conf, self.paths, log=log, **options)

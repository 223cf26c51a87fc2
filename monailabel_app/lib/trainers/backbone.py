"""Train task `backbone`: denoising pretraining of the diffusion U-Net on ALL datastore images, then
the segmenter retrained on the new features - one job.

Labels are not needed for the first part: this is where the many unlabeled images of a MONAI Label
datastore teach the frozen feature extractor the user's own domain. Pretraining continues the
current backbone. A segmenter trained on other features is meaningless, so when labels exist the
job then trains fusion + head on the new backbone (starting from the served ones) and publishes the
pair only if its validation Dice is not below the served model's on the same images; otherwise
neither the backbone nor the model changes and the stats say why. Without labels the backbone alone
is published (a served model keeps its own copy of the backbone it was trained with).
"""

from __future__ import annotations

from typing import Any, Dict

from lib.trainers.base import FastTextDiffTrainTask
from lib.validation import bad_request


class BackbonePretrain(FastTextDiffTrainTask):
    name = "backbone"

    def __init__(self, conf, paths):
        super().__init__(conf, paths,
                         "FastTextDiff: pretrain the diffusion backbone on all images (no labels needed), "
                                      "then retrain the segmenter on its features")

    def default_epochs(self) -> int:
        return self.conf.backbone_epochs

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "segmenter_epochs": self.conf.epochs}

    def pre_process(self, request: Dict[str, Any], datastore) -> Dict[str, Any]:
        from lib.validation import check_int

        if not datastore.list_images():
            raise bad_request(409, "the datastore has no images to pretrain on")
        return {"segmenter_epochs": check_int(request.get("segmenter_epochs", self.conf.epochs), "segmenter_epochs",
                                              1, 10000)}

    def refusal(self, datastore, model_state: str) -> str | None:
        reason = super().refusal(datastore, model_state)
        if reason:
            return reason
        if not datastore.list_images():
            return "the datastore has no images to pretrain on: upload images first (PUT /datastore/image)"
        return None

    def run(self, datastore: Any, options: Dict[str, Any], log) -> Dict[str, Any]:
        from fasttextdiff.utils.atomic import publish

        from lib.training import pretrain_backbone_from_datastore, train_segmenter_from_datastore

        seg_epochs = options.pop("segmenter_epochs")
        backbone = pretrain_backbone_from_datastore(datastore, self.conf, self.paths, log=log, publish_result=False,
                                                    **options)
        run_dir = backbone["run_dir"]
        if not datastore.get_labeled_images():
            backbone.update(published=str(publish(run_dir, self.paths.backbone_root)), decision="published",
                            reason="published the backbone: no labeled images to train and compare a segmenter on")
            return backbone
        segmenter = train_segmenter_from_datastore(
            datastore, self.conf, self.paths, epochs=seg_epochs, batch_size=options["batch_size"], lr=self.conf.lr,
            device=options["device"], log=log, num_processes=options["num_processes"], gpu_ids=options["gpu_ids"],
            backbone_dir=run_dir, task=self.name)
        result = {"backbone": {k: v for k, v in backbone.items() if k not in ("history", "run_dir")},
                  "segmenter": segmenter, "decision": segmenter["decision"], "reason": segmenter["reason"],
                  "val_dice": segmenter.get("val_dice"), "best_val_dice": segmenter.get("best_val_dice"),
                  "published": segmenter.get("published")}
        if segmenter.get("published"):
            result["backbone_published"] = str(publish(run_dir, self.paths.backbone_root))
        return result

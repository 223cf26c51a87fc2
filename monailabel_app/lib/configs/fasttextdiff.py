"""Task config of the `fasttextdiff` model: which infer, train, strategy and scoring tasks it offers.

The radiology sample app's TaskConfig reads its options from an untyped dict with `strtobool`
and `eval`; this one receives the already validated `AppConf` and only wires tasks together.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from monailabel.tasks.activelearning.first import First

from lib.activelearning.random import LeastRecentRandom
from lib.activelearning.report_mismatch import ReportMismatchStrategy
from lib.activelearning.uncertainty import UncertaintyStrategy
from lib.configs.app_conf import AppConf
from lib.datastore import SCORE_KEY
from lib.infers.fasttextdiff import FastTextDiffInfer
from lib.model_manager import ModelManager, ModelPaths
from lib.scoring.uncertainty import ReportUncertaintyScoring
from lib.trainers.backbone import BackbonePretrain
from lib.trainers.fasttextdiff import FastTextDiffTrain

NAME = "fasttextdiff"
SCORING = SCORE_KEY


class FastTextDiffConfig:
    """Builds the tasks of one model from the app's conf, paths and model manager."""

    def __init__(self, conf: AppConf, paths: ModelPaths, manager: ModelManager, datastore: Callable[[], Any]):
        self.conf, self.paths, self.manager, self._datastore = conf, paths, manager, datastore

    def infers(self) -> Dict[str, Any]:
        return {NAME: FastTextDiffInfer(self.conf, self.manager, self._datastore)}

    def trainers(self) -> Dict[str, Any]:
        return {NAME: FastTextDiffTrain(self.conf, self.paths), "backbone": BackbonePretrain(self.conf, self.paths)}

    def strategies(self) -> Dict[str, Any]:
        return {"uncertainty": UncertaintyStrategy(self.manager),
                "report_mismatch": ReportMismatchStrategy(self.manager),
                "random": LeastRecentRandom(), "first": First()}

    def scoring_methods(self) -> Dict[str, Any]:
        return {SCORING: ReportUncertaintyScoring(self.manager, max(2, self.conf.n_noise))}

"""FastTextDiff: report-conditioned, label-efficient diffusion segmentation for medical images.

A frozen denoising U-Net gives multi-scale image features; the report's token states (ModernBERT,
or any Hugging Face encoder) steer them through cross-modal attention; a small head segments.

The public API, for Python users::

    from fasttextdiff import Segmenter
    seg = Segmenter.load("runs/model")                      # a model directory (`fasttextdiff train --out`)
    result = seg.segment_file("ct.nii.gz", "Opacity in the right lower lobe.", "mask.nii.gz")
    print(result.summary["foreground_fraction"])

Every name below is imported on first use (PEP 562), so `import fasttextdiff` stays cheap: it does not
import torch, and it leaves the process (os.environ, threads, logging) as it found it. The entry points
(the `fasttextdiff` command, the server, the benchmarks) set their own process defaults.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # segment an image or a volume with its report
    "Segmenter": "fasttextdiff.inference.pipeline",
    "SegmentationResult": "fasttextdiff.inference.pipeline",
    "InferenceOptions": "fasttextdiff.inference.batched",
    # read and write images and volumes in their own geometry
    "Image": "fasttextdiff.data.io",
    "read_image": "fasttextdiff.data.io",
    "write_image": "fasttextdiff.data.io",
    # data sets: LViT layout (QaTa-COV19, MosMedData+, MoNuSeg), labeled subsets, synthetic sets
    "Sample": "fasttextdiff.data.lvit",
    "load_split": "fasttextdiff.data.lvit",
    "load_lvit": "fasttextdiff.training.workflows",
    "select_labeled": "fasttextdiff.data.dataset",
    "make_lvit_dataset": "fasttextdiff.data.synthetic",
    # train: the diffusion backbone on unlabeled images, the segmenter on a few labels, the text encoder
    "pretrain_backbone": "fasttextdiff.training.backbone",
    "train_segmenter": "fasttextdiff.training.segmenter",
    "pretrain_text": "fasttextdiff.training.text_mlm",
    # evaluate: per-image (per-volume) Dice and IoU
    "evaluate_model": "fasttextdiff.inference.evaluate",
    # configuration records (saved as JSON beside the weights)
    "BackboneConfig": "fasttextdiff.config",
    "TextConfig": "fasttextdiff.config",
    "FusionConfig": "fasttextdiff.config",
    "SegmenterConfig": "fasttextdiff.config",
    "TrainConfig": "fasttextdiff.config",
    "PretrainConfig": "fasttextdiff.config",
    # parts, for those who build their own pipeline
    "FastTextDiffModel": "fasttextdiff.models.segmenter",
    "DiffusionBackbone": "fasttextdiff.models.backbone",
    "load_backbone": "fasttextdiff.models.backbone",
    "TextEncoder": "fasttextdiff.text.encoder",
    # errors: every refusal is one of these, with a sentence that says why
    "FastTextDiffError": "fasttextdiff.utils.errors",
    "ImageReadError": "fasttextdiff.utils.errors",
    "ReportError": "fasttextdiff.utils.errors",
    "ModelNotFoundError": "fasttextdiff.utils.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fasttextdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs only; nothing is imported at run time
    from fasttextdiff.config import (BackboneConfig, FusionConfig, PretrainConfig, SegmenterConfig, TextConfig,
                                     TrainConfig)
    from fasttextdiff.data.dataset import select_labeled
    from fasttextdiff.data.io import Image, read_image, write_image
    from fasttextdiff.data.lvit import Sample, load_split
    from fasttextdiff.data.synthetic import make_lvit_dataset
    from fasttextdiff.inference.batched import InferenceOptions
    from fasttextdiff.inference.evaluate import evaluate_model
    from fasttextdiff.inference.pipeline import SegmentationResult, Segmenter
    from fasttextdiff.models.backbone import DiffusionBackbone, load_backbone
    from fasttextdiff.models.segmenter import FastTextDiffModel
    from fasttextdiff.text.encoder import TextEncoder
    from fasttextdiff.training.backbone import pretrain_backbone
    from fasttextdiff.training.segmenter import train_segmenter
    from fasttextdiff.training.text_mlm import pretrain_text
    from fasttextdiff.training.workflows import load_lvit
    from fasttextdiff.utils.errors import FastTextDiffError, ImageReadError, ModelNotFoundError, ReportError

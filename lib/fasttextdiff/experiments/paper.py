"""The paper's settings as data: per-dataset presets (taps, timesteps, size, epochs, optimizer) and the
published results our reproductions are compared with.

Why a module: `train --preset`, `fasttextdiff reproduce` and the README must agree on these numbers;
they come from the reference configs (siddharthdhara/FastTextDiff `experiments/*/ddpm.json`, its
train.py) and from the LViT paper's tables, and live here once.
"""

from __future__ import annotations

from dataclasses import dataclass

# ADM output_blocks the reference configs tap (siddharthdhara/FastTextDiff experiments/*/ddpm.json)
PAPER_TAPS: dict[str, tuple[int, ...]] = {"qata": (4, 6, 8, 12), "mosmed": (4, 6, 8, 12), "monuseg": (6, 8, 12, 16)}

__all__ = ["PaperPreset", "PRESETS", "DATASETS", "ANCHORS", "preset_for"]


@dataclass(frozen=True)
class PaperPreset:
    """One dataset's reference training recipe on ADM's 256x256_diffusion_uncond backbone.

    ``taps`` are ADM output_blocks; the timesteps share one noise draw (our backbone always does).
    The optimizer is the reference's Adam at lr 1e-4 without weight decay (its MultiStepLR steps at
    epoch 60, which only MosMedData+'s 100 epochs reach; we keep the rate constant).
    """

    name: str
    dataset: str
    taps: tuple[int, ...]
    epochs: int
    timesteps: tuple[int, ...] = (50, 150, 250)
    image_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0

    def backbone_overrides(self) -> dict:
        return {"feature_taps": self.taps, "timesteps": self.timesteps, "image_size": self.image_size}


PRESETS: dict[str, PaperPreset] = {
    "paper-qata": PaperPreset("paper-qata", "qata", PAPER_TAPS["qata"], epochs=50),
    "paper-mosmed": PaperPreset("paper-mosmed", "mosmed", PAPER_TAPS["mosmed"], epochs=100),
    "paper-monuseg": PaperPreset("paper-monuseg", "monuseg", PAPER_TAPS["monuseg"], epochs=50),
}
DATASETS: dict[str, str] = {"qata": "QaTa-COV19", "mosmed": "MosMedData+", "monuseg": "MoNuSeg"}

# Published test results with 100% of the labels (LViT paper, Li et al., IEEE TMI 2023), Dice / IoU in %.
ANCHORS: dict[str, list[dict]] = {
    "qata": [{"method": "LViT (published)", "dice": 83.66, "iou": 75.11},
             {"method": "U-Net (published)", "dice": 79.02, "iou": None}],
    "mosmed": [{"method": "LViT (published)", "dice": 74.57, "iou": 61.33}],
    "monuseg": [{"method": "LViT (published)", "dice": 80.36, "iou": 67.31},
                {"method": "U-Net (published)", "dice": 76.45, "iou": None}],
}


def preset_for(dataset: str) -> PaperPreset:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; the paper's are {', '.join(DATASETS)}")
    return PRESETS[f"paper-{dataset}"]

"""Does the report steer the segmentation? Text vs `no_text` on the text-necessary synthetic set.

On that set several look-alike lesions appear and only those the report names are labeled, so an
image-only model cannot know which to mark: the Dice gap between the two runs (same data, seed,
labels, backbone and schedule) measures what the text contributes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fasttextdiff.utils.atomic import atomic_write_json
from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig, TextConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AblationPlan:
    size: int = 64
    n_train: int = 64
    n_val: int = 16
    n_test: int = 32
    widths: tuple[int, ...] = (16, 32, 64)
    pretrain_steps: int = 150
    pretrain_batch: int = 8
    epochs: int = 40
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    fusion_dim: int = 32


QUICK = AblationPlan()
FULL = AblationPlan(size=128, n_train=400, n_val=50, n_test=200, widths=(32, 64, 128, 128), pretrain_steps=4000,
                    epochs=60, fusion_dim=64)


def run_ablation(quick: bool = True, work_dir: str | Path | None = None, seed: int = 0,
                 json_path: str | Path | None = None, device=None, progress: bool = True) -> dict:
    plan = QUICK if quick else FULL
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="fasttextdiff-ablation-") as tmp:
            return _run(plan, Path(tmp), seed, json_path, device, progress)
    return _run(plan, Path(work_dir), seed, json_path, device, progress)


def _run(plan: AblationPlan, work: Path, seed: int, json_path, device, progress: bool) -> dict:
    from fasttextdiff.data.synthetic import make_lvit_dataset
    from fasttextdiff.inference.evaluate import evaluate_model
    from fasttextdiff.training.workflows import load_lvit, lvit_image_paths, pretrain_backbone_on_files
    from fasttextdiff.training.segmenter import train_segmenter

    started = time.time()
    timings: dict[str, float] = {}
    data = make_lvit_dataset(work / "data", variant="text-necessary", n_train=plan.n_train, n_val=plan.n_val,
                             n_test=plan.n_test, size=plan.size, seed=seed)
    splits = load_lvit(data)
    t = time.time()
    backbone_cfg = BackboneConfig(image_size=plan.size, block_out_channels=plan.widths, noise_seed=seed)
    pretrain_backbone_on_files(lvit_image_paths(data), backbone_cfg, work / "backbone", epochs=10_000,
                               max_steps=plan.pretrain_steps, batch_size=plan.pretrain_batch, seed=seed, device=device,
                               progress=progress, resume=False)
    timings["pretrain_backbone_s"] = time.time() - t

    result: dict = {"dataset": "synthetic text-necessary", "seed": seed, "quick": plan is QUICK,
                    "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.__dict__.items()}}
    for name, use_text in (("text", True), ("no_text", False)):
        t = time.time()
        seg = SegmenterConfig(use_text=use_text, fusion=FusionConfig(dim=plan.fusion_dim, heads=4))
        train_cfg = TrainConfig(epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr, seed=seed)
        metrics = train_segmenter(splits["train"], work / f"model_{name}", backbone_dir=work / "backbone",
                                  text_config=TextConfig(encoder="tiny"), segmenter_config=seg, train_config=train_cfg,
                                  val_samples=splits["val"], device=device, progress=progress)
        if use_text:  # the library's default text path; text_fallback says which phase validation kept
            result["text_path"] = {"text_residual": seg.fusion.text_residual, "text_fallback": train_cfg.text_fallback,
                                   "kept": metrics.get("text_fallback", "text")}
        timings[f"train_{name}_s"] = time.time() - t
        scores = evaluate_model(work / f"model_{name}", splits["test"], device=device, progress=progress)
        result[f"dice_{name}"] = scores["dice_mean"]
        result[f"iou_{name}"] = scores["iou_mean"]
        result[f"dice_std_{name}"] = scores["dice_std"]
        log.info("%s: test Dice %.3f, IoU %.3f", name, scores["dice_mean"], scores["iou_mean"])
    result["dice_gain"] = result["dice_text"] - result["dice_no_text"]
    result["timings"] = {k: round(v, 1) for k, v in timings.items()}
    result["seconds"] = round(time.time() - started, 1)
    if json_path:
        atomic_write_json(json_path, result)
    return result


def run_demo(out: Path, device=None) -> dict:
    """make demo: data -> backbone -> model -> test evaluation -> one segmentation written to disk."""
    from fasttextdiff.data.synthetic import make_lvit_dataset
    from fasttextdiff.inference.evaluate import evaluate_model
    from fasttextdiff.inference.pipeline import Segmenter
    from fasttextdiff.training.workflows import load_lvit, lvit_image_paths, pretrain_backbone_on_files
    from fasttextdiff.training.segmenter import train_segmenter

    plan = QUICK
    data = make_lvit_dataset(out / "data", variant="text-necessary", n_train=plan.n_train, n_val=plan.n_val,
                             n_test=plan.n_test, size=plan.size, seed=0)
    splits = load_lvit(data)
    cfg = BackboneConfig(image_size=plan.size, block_out_channels=plan.widths)
    pretrain_backbone_on_files(lvit_image_paths(data), cfg, out / "backbone", epochs=10_000,
                               max_steps=plan.pretrain_steps, batch_size=plan.pretrain_batch, device=device)
    train_segmenter(splits["train"], out / "model", backbone_dir=out / "backbone", text_config=TextConfig(),
                    segmenter_config=SegmenterConfig(fusion=FusionConfig(dim=plan.fusion_dim)),
                    train_config=TrainConfig(epochs=plan.epochs, lr=plan.lr), val_samples=splits["val"], device=device)
    scores = evaluate_model(out / "model", splits["test"], device=device)
    atomic_write_json(out / "evaluation.json", scores)
    sample = splits["test"][0]
    result = Segmenter.load(out / "model", device=device).segment_file(
        sample.image, sample.text, out / "example_mask.png", out / "example_uncertainty.png")
    print(f"test Dice {scores['dice_mean']:.3f} (IoU {scores['iou_mean']:.3f}) on {scores['n']} images")
    print(f"example: {sample.image.name} with report {sample.text!r} -> {out / 'example_mask.png'} "
          f"(uncertainty mean {result.summary['uncertainty_mean']:.4f})")
    return scores

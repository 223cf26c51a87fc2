"""Segmenter training: cached and augmented paths, determinism, resume after an interruption, and
evaluation figures (two-process DDP under accelerate launch: tests/library/test_engine.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fasttextdiff.config import FusionConfig, SegmenterConfig, TextConfig, TrainConfig
from fasttextdiff.inference.evaluate import evaluate_model
from fasttextdiff.models.segmenter import MODEL_CONFIG_FILE, WEIGHTS_FILE
from fasttextdiff.training.workflows import load_lvit
from fasttextdiff.training.segmenter import RESUME_DIR_SUFFIX, train_segmenter

SEG = SegmenterConfig(head_channels=8, fusion=FusionConfig(dim=16, heads=2))


def _train(data, backbone, out, **train_kwargs):
    splits = load_lvit(data)
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-3, **train_kwargs})
    return train_segmenter(splits["train"], out, backbone_dir=backbone, text_config=TextConfig(encoder="tiny"),
                           segmenter_config=SEG, train_config=cfg, val_samples=splits["val"],
                           test_samples=splits["test"], progress=False)


@pytest.mark.parametrize("augment", [False, True])
def test_training_writes_a_complete_model_dir(tmp_path, tiny_dataset, tiny_backbone, augment):
    metrics = _train(tiny_dataset, tiny_backbone, tmp_path / "m", augment=augment)
    assert metrics["feature_cache"] is (not augment)
    # text_fallback (the default, with a validation split): 2 image-only epochs, then 2 with the report
    assert metrics["epochs"] == 4 and len(metrics["history"]) == 4 and metrics["text_fallback"] in ("image", "text")
    assert 0 <= metrics["best_val_dice"] <= 1 and 0 <= metrics["test"]["dice"] <= 1
    for name in (MODEL_CONFIG_FILE, WEIGHTS_FILE, "backbone", "text_encoder.json"):
        assert (tmp_path / "m" / name).exists(), name
    assert not any(p.name.startswith(".m.staging") for p in tmp_path.iterdir())  # staging cleaned up
    assert not (tmp_path / f"m{RESUME_DIR_SUFFIX}").exists()


def test_feature_cache_too_big_for_memory_spills_to_disk_with_the_same_weights(tmp_path, tiny_dataset, tiny_backbone):
    memory = _train(tiny_dataset, tiny_backbone, tmp_path / "mem", seed=5)
    disk = _train(tiny_dataset, tiny_backbone, tmp_path / "disk", seed=5, feature_cache_gb=1e-9)
    assert memory["feature_cache"] and not memory["feature_cache_on_disk"]
    assert disk["feature_cache"] and disk["feature_cache_on_disk"]
    a, b = load_file(tmp_path / "mem" / WEIGHTS_FILE), load_file(tmp_path / "disk" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_and_labeled_subset(tmp_path, tiny_dataset, tiny_backbone):
    a = _train(tiny_dataset, tiny_backbone, tmp_path / "a", seed=3, labeled=4)
    _train(tiny_dataset, tiny_backbone, tmp_path / "b", seed=3, labeled=4)
    assert a["labeled_images"] == 4
    wa, wb = load_file(str(tmp_path / "a" / WEIGHTS_FILE)), load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_training_resumes_and_keeps_old_model(tmp_path, tiny_dataset, tiny_backbone):
    out = tmp_path / "m"
    _train(tiny_dataset, tiny_backbone, out, epochs=1)
    before = (out / WEIGHTS_FILE).read_bytes()

    class Interrupt(Exception):
        pass

    def stop_after_second_epoch(record):
        if record["epoch"] == 2:
            raise Interrupt

    splits = load_lvit(tiny_dataset)
    # another lr than the published model's run; 2 epochs = 2 image-only + 2 with text (text_fallback, the
    # default), so the interrupted run resumes across the switch between the two phases
    resumed_cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-4)
    with pytest.raises(Interrupt):
        train_segmenter(splits["train"], out, backbone_dir=tiny_backbone, text_config=TextConfig(encoder="tiny"),
                        segmenter_config=SEG, train_config=resumed_cfg, progress=False,
                        log=stop_after_second_epoch, val_samples=splits["val"])
    assert (out / WEIGHTS_FILE).read_bytes() == before  # the published model is untouched
    state = json.loads((tmp_path / f"m{RESUME_DIR_SUFFIX}" / "state.json").read_text(encoding="utf-8"))
    assert state["epoch"] == 1  # the interrupt came before epoch 2 was saved

    seen = []
    metrics = train_segmenter(splits["train"], out, backbone_dir=tiny_backbone, text_config=TextConfig(encoder="tiny"),
                              segmenter_config=SEG, train_config=resumed_cfg,
                              progress=False, log=lambda r: seen.append(r["epoch"]), val_samples=splits["val"])
    assert seen == [2, 3, 4] and [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert (out / WEIGHTS_FILE).read_bytes() != before

    # the resume state holds the RNG states too: the resumed run is the uninterrupted run, bit for bit
    straight = train_segmenter(splits["train"], tmp_path / "straight", backbone_dir=tiny_backbone,
                               text_config=TextConfig(encoder="tiny"), segmenter_config=SEG, train_config=resumed_cfg,
                               progress=False, val_samples=splits["val"])
    assert straight["history"] == metrics["history"]
    assert (tmp_path / "straight" / WEIGHTS_FILE).read_bytes() == (out / WEIGHTS_FILE).read_bytes()


def test_evaluate_reports_per_image_figures(tiny_model, tiny_dataset):
    result = evaluate_model(tiny_model, load_lvit(tiny_dataset)["test"], progress=False)
    assert result["n"] == len(result["per_image"]) == 4
    assert 0 <= result["dice_mean"] <= 1 and result["dice_std"] >= 0
    assert all(0 <= r["dice"] <= 1 and 0 <= r["iou"] <= r["dice"] + 1e-9 for r in result["per_image"])


def test_any_diffusers_unet_checkpoint_serves_as_backbone(tmp_path, tiny_dataset):
    from diffusers import UNet2DModel

    UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                layers_per_block=1).save_pretrained(tmp_path / "unet")
    metrics = _train(tiny_dataset, tmp_path / "unet", tmp_path / "m", epochs=1)
    assert metrics["epochs"] == 2 and (tmp_path / "m" / "backbone" / "backbone_config.json").is_file()  # text_fallback

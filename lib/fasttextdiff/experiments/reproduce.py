"""`fasttextdiff reproduce`: the paper's grid for one dataset (labeled fractions x seeds), each setting
trained with `train_segmenter` and scored with `evaluate_model`, tabled beside the published results.

Resumable at two levels: a setting whose ``result.json`` exists (with the same settings) is skipped,
and a setting killed mid-training resumes from its epoch through `train_segmenter`'s own resume state.
The table is JSON (everything), markdown (the comparison) and a PNG bar chart.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fasttextdiff.utils.atomic import atomic_path, atomic_write_json
from fasttextdiff.utils.checkpoint import read_json
from fasttextdiff.config import MODEL_CONFIG_FILE, SegmenterConfig, TextConfig, TrainConfig
from fasttextdiff.experiments.paper import ANCHORS, DATASETS, preset_for

log = logging.getLogger(__name__)
RESULT_NAME = "result.json"
TRAIN_NAME = "train.json"


def setting_name(fraction: float, seed: int) -> str:
    return f"labeled-{fraction:g}-seed-{seed}"


def check_fractions(labeled: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(f) for f in labeled)
    if not values or any(not 0 < f <= 1 for f in values):
        raise ValueError(f"--labeled takes fractions in (0, 1] of the training split, got {list(labeled)}")
    return tuple(sorted(set(values)))


def _seconds_per_epoch(stamps: Sequence[float], start: float) -> float | None:
    """Mean time between epoch ends; the first epoch (which also pays for caching features and
    encoding reports) counts only when it is the only one."""
    if not stamps:
        return None
    gaps = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    return float(statistics.fmean(gaps[1:] if len(gaps) > 1 else gaps))


def run_setting(setting_dir: Path, fraction: float, seed: int, splits: dict, *, backbone_dir: Path,
                text_config: TextConfig, segmenter_config: SegmenterConfig, train_config: TrainConfig,
                backbone_overrides: dict, settings: dict, device: str | None, progress: bool) -> dict:
    """Train (or resume, or reuse a finished model) and evaluate one setting; writes its result.json."""
    from fasttextdiff.inference.evaluate import evaluate_model
    from fasttextdiff.inference.pipeline import Segmenter
    from fasttextdiff.training.segmenter import train_segmenter

    model_dir = setting_dir / "model"
    train_file = setting_dir / TRAIN_NAME
    trained = read_json(train_file) if train_file.is_file() and (model_dir / MODEL_CONFIG_FILE).is_file() else None
    if trained is None or trained.get("settings") != settings:
        setting_dir.mkdir(parents=True, exist_ok=True)
        stamps: list[float] = []
        start = time.perf_counter()
        metrics = train_segmenter(
            splits["train"], model_dir, backbone_dir=backbone_dir, text_config=text_config,
            segmenter_config=segmenter_config,
            train_config=train_config.replace(labeled=None if fraction >= 1 else fraction, seed=seed),
            val_samples=splits.get("val"), device=device, progress=progress,
            log=lambda _record: stamps.append(time.perf_counter()), backbone_overrides=backbone_overrides)
        metrics.pop("history", None)
        trained = {"settings": settings, "metrics": metrics, "seconds_per_epoch": _seconds_per_epoch(stamps, start),
                   "epochs_timed": len(stamps)}
        atomic_write_json(train_file, trained)
    split = "test" if splits.get("test") else "val"
    segmenter = Segmenter.load(model_dir, device=device, n_noise=1)
    started = time.perf_counter()
    scores = evaluate_model(segmenter, splits[split], n_noise=1, progress=progress)
    elapsed = time.perf_counter() - started
    result = {
        "setting": setting_dir.name, "labeled": fraction, "seed": seed, "settings": settings,
        "split": split, "n": scores["n"],
        "dice": scores["dice_mean"], "dice_std": scores["dice_std"],
        "iou": scores["iou_mean"], "iou_std": scores["iou_std"],
        "labeled_images": trained["metrics"]["labeled_images"],
        "best_val_dice": trained["metrics"].get("best_val_dice"),
        "train_seconds": trained["metrics"]["seconds"],
        "seconds_per_epoch": trained["seconds_per_epoch"],
        "feature_cache": trained["metrics"].get("feature_cache"),
        "inference_seconds_per_image": elapsed / max(1, scores["n"]),
        "device": str(segmenter.device),
    }
    atomic_write_json(setting_dir / RESULT_NAME, result)
    return result


def reproduce(dataset: str, data_dir: str | Path, backbone_dir: str | Path, out_dir: str | Path, *,
              text_config: TextConfig, segmenter_config: SegmenterConfig, train_config: TrainConfig,
              backbone_overrides: dict, labeled: Sequence[float] = (0.25, 0.5, 1.0), seeds: int = 1,
              device: str | None = None, progress: bool = True,
              report: Callable[[str], None] | None = None) -> dict:
    """Every (fraction, seed) setting, then the comparison table; returns what results.json holds."""
    from fasttextdiff.training.workflows import load_lvit

    preset_for(dataset)  # refuses an unknown dataset
    fractions = check_fractions(labeled)
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    backbone_dir, out = Path(backbone_dir), Path(out_dir)
    if not backbone_dir.is_dir():
        raise FileNotFoundError(f"backbone directory {backbone_dir} does not exist; convert one with "
                                "`fasttextdiff convert-backbone 256x256_diffusion_uncond.pt --arch adm-256-uncond "
                                "--out DIR`")
    splits = load_lvit(data_dir)
    settings = {"dataset": dataset, "backbone": str(backbone_dir.resolve()), "backbone_overrides": backbone_overrides,
                "text": text_config.to_dict(), "segmenter": segmenter_config.to_dict(),
                "train": {k: v for k, v in train_config.to_dict().items() if k not in ("labeled", "seed")}}
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from JSON
    rows = []
    for fraction in fractions:
        for seed in range(seeds):
            setting_dir = out / "runs" / setting_name(fraction, seed)
            done = setting_dir / RESULT_NAME
            if done.is_file():
                previous = read_json(done)
                if previous.get("settings") == settings:
                    (report or log.info)(f"{setting_dir.name}: done before, skipped")
                    rows.append(previous)
                    continue
                log.warning("%s was run with other settings; running it again", setting_dir.name)
            (report or log.info)(f"{setting_dir.name}: training")
            rows.append(run_setting(setting_dir, fraction, seed, splits, backbone_dir=backbone_dir,
                                    text_config=text_config, segmenter_config=segmenter_config,
                                    train_config=train_config, backbone_overrides=backbone_overrides,
                                    settings=settings, device=device, progress=progress))
    summary = summarise(dataset, rows)
    result = {"dataset": dataset, "dataset_name": DATASETS[dataset], "settings": settings, "table": summary,
              "anchors": ANCHORS[dataset], "runs": rows}
    write_tables(out, result)
    return result


def summarise(dataset: str, rows: Sequence[dict]) -> list[dict]:
    """One line per labeled fraction: mean (and spread over seeds) of Dice/IoU in %, times."""
    lines = []
    for fraction in sorted({r["labeled"] for r in rows}):
        group = [r for r in rows if r["labeled"] == fraction]

        def mean(key: str, scale: float = 1.0) -> float | None:
            values = [r[key] * scale for r in group if r.get(key) is not None]
            return float(statistics.fmean(values)) if values else None

        def spread(key: str) -> float | None:
            values = [r[key] * 100 for r in group]
            return float(statistics.pstdev(values)) if len(values) > 1 else None

        lines.append({"method": "FastTextDiff (this run)", "labeled": fraction, "seeds": len(group),
                      "labeled_images": group[0]["labeled_images"], "test_images": group[0]["n"],
                      "dice": mean("dice", 100), "dice_seed_std": spread("dice"),
                      "iou": mean("iou", 100), "iou_seed_std": spread("iou"),
                      "seconds_per_epoch": mean("seconds_per_epoch"),
                      "inference_ms_per_image": mean("inference_seconds_per_image", 1000)})
    return lines


def _fmt(value: float | None, spread: float | None = None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def markdown_table(result: dict) -> str:
    s = result["settings"]
    overrides = s["backbone_overrides"]
    lines = [f"# {result['dataset_name']}: FastTextDiff reproduction beside the published results", "",
             f"Backbone `{s['backbone']}` (taps {overrides.get('feature_taps', 'as configured')}, timesteps "
             f"{overrides.get('timesteps', 'as configured')}, {overrides.get('image_size', 'its')} px), "
             f"text encoder `{s['text']['encoder']}`"
             + (f" truncated to {s['text']['max_length']} tokens" if s["text"].get("max_length") else "")
             + f", {s['train']['epochs']} epochs, lr {s['train']['lr']:g}, fusion dim "
               f"{s['segmenter']['fusion']['dim']}.",
             "Published rows are with 100% of the labels, as reported in the LViT paper (Li et al., IEEE TMI 2023).",
             "", "| method | labels | Dice (%) | IoU (%) | seconds / epoch | inference ms / image | seeds |",
             "|---|---|---|---|---|---|---|"]
    for row in result["table"]:
        lines.append(f"| {row['method']} | {row['labeled']:.0%} ({row['labeled_images']} images) | "
                     f"{_fmt(row['dice'], row['dice_seed_std'])} | {_fmt(row['iou'], row['iou_seed_std'])} | "
                     f"{_fmt(row['seconds_per_epoch'])} | {_fmt(row['inference_ms_per_image'], digits=1)} | "
                     f"{row['seeds']} |")
    for anchor in result["anchors"]:
        lines.append(f"| {anchor['method']} | 100% | {_fmt(anchor['dice'])} | {_fmt(anchor['iou'])} | – | – | – |")
    return "\n".join(lines) + "\n"


def plot_table(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [(f"ours {r['labeled']:.0%}", r["dice"] or 0.0, r["dice_seed_std"] or 0.0) for r in result["table"]]
    theirs = [(a["method"].replace(" (published)", "\n(published)"), a["dice"], 0.0) for a in result["anchors"]]
    names = [n for n, _, _ in ours + theirs]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 1.5, 3.6))
    ax.bar(range(len(ours)), [v for _, v, _ in ours], yerr=[e for _, _, e in ours], color="tab:blue", label="this run")
    ax.bar(range(len(ours), len(names)), [v for _, v, _ in theirs], color="tab:gray", label="published (100% labels)")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("test Dice (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{result['dataset_name']}: FastTextDiff vs published")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_tables(out: Path, result: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "png": out / "results.png"}
    atomic_write_json(paths["json"], result)
    with atomic_path(paths["markdown"]) as tmp:
        Path(tmp).write_text(markdown_table(result), encoding="utf-8")
    plot_table(result, paths["png"])
    return paths

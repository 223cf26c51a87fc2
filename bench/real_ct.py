"""Real CT: structures named by text, and lesions named by a report, scored per volume across patients.

The scans are the real CTs shipped in TotalSegmentator's sdist (`fasttextdiff.data.real_ct`, fetched by
`make setup`, never committed; Apache-2.0). Their reference masks are TotalSegmentator's own outputs,
not expert masks. Every task trains on one patient and tests on another (A: upper abdomen, 3 mm; B: a
DICOM series, 0.98 x 0.98 x 2 mm); every Dice is one 3D Dice per test volume, in the volume's own grid,
after the mask is pasted back (as the Medical Segmentation Decathlon and nnU-Net report).

* anatomy: one model for all structures both patients have; the report names the structure ("the
  spleen", "Rib 9 on the right."). Left/right pairs and numbered ribs make the text necessary.
* lesions: synthetic lesions inserted into the real organs (`real_ct.insert_lesions`: the scan's own
  noise kept, partial-volume blur); the report names some and not others (decoys), with negations.
  Dice of the named lesions per volume; detection: a named lesion is found when a predicted 3D
  component overlaps it; a component on no named lesion is a false positive (`utils.metrics`).

Methods, on the same labels and budget: `fasttextdiff` (the server's default recipe: its backbone
widths, 128 px, noise draws), `no_text` (the same network without the report), and the MONAI networks a
MONAI Label user would train instead (`monai_baselines`: a 3D UNet as in MONAI Label's radiology app, a
2D UNet on the same slices); those have no text: the anatomy task trains them multi-class (a channel
per structure, read for the named one), the lesion task on the named lesions.
A budget is the labeled share of the training patient's slices (the same slices for every method).

    python bench/real_ct.py --quick     # A -> B, 10 structures, budgets 25 % and 100 %, one seed
    python bench/real_ct.py             # both directions, budgets 10/25/100 %, seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import common

RESULT_NAME = "real_ct"
GOALS = {"anatomy_dice_goal": 0.80, "goal_structures": ["liver", "spleen", "stomach", "aorta", "autochthon_left",
                                                        "autochthon_right"],
         "lesion_text_gap_goal": 0.20, "lesion_over_baseline_goal": 0.05, "detection_goal": 0.80,
         "fp_goal": 0.5}


@dataclass
class Plan:
    directions: list = field(default_factory=lambda: [("A", "B")])
    budgets: list = field(default_factory=lambda: [0.25, 1.0])
    seeds: list = field(default_factory=lambda: [0])
    size: int = 128
    widths: tuple = (16, 32, 32)
    pretrain_steps: int = 250
    steps: int = 250  # optimiser steps of fusion + head, whatever the budget (epochs follow from the item count)
    batch_size: int = 8
    n_noise: int = 1
    phrasings: int = 6  # training requests per structure, each worded differently
    structures: tuple | None = ("liver", "spleen", "stomach", "aorta", "autochthon_left", "autochthon_right",
                                "rib_left_9", "rib_right_9", "inferior_vena_cava", "pancreas")  # None: all shared
    lesion_variants: int = 3  # lesion copies of each patient (different lesions and reports)
    baseline_steps: int = 200  # MONAI baselines: a step count, not seconds (the machine's load varies)
    methods: tuple = ("fasttextdiff", "no_text", "monai_unet3d", "monai_unet2d")
    window: tuple = (50.0, 350.0)  # soft tissue: the structures and lesions here are abdominal organs


# ------------------------------------------------------------------------------------------------ data
def labeled_slices(n: int, budget: float, seed: int) -> list[int]:
    """The labeled share of a patient's slices: one contiguous slab at a seeded offset, the same for every
    method (a 3D network can only learn from a labeled sub-volume; a person labels a slab, not a scatter)."""
    k = max(1, int(round(budget * n)))
    if k >= n:
        return list(range(n))
    start = int(np.random.default_rng(seed).integers(0, n - k + 1))
    return list(range(start, start + k))


def volume_samples(work: Path, array: np.ndarray, like, masks: dict[str, np.ndarray], texts: dict[str, str],
                   zs: list[int], tag: str) -> list:
    """One training sample per target (structure or named lesions): the whole volume, its mask for that
    target, its report, and the labeled slices; the dataset slices it as inference does."""
    from fasttextdiff.data.io import write_image
    from fasttextdiff.data.lvit import Sample

    work.mkdir(parents=True, exist_ok=True)
    image = write_image(work / f"{tag}.nii.gz", array.astype(np.float32), like)
    return [Sample(image=image, mask=write_image(work / f"{tag}_{key}.nii.gz", (mask > 0).astype(np.uint8), like),
                   text=texts[key], name=f"{tag}:{key}", slices=tuple(zs)) for key, mask in masks.items()]


def resample(array: np.ndarray, spacing: tuple, target: tuple, nearest: bool, shape: tuple | None = None):
    """A (Z, Y, X) array from `spacing` (x, y, z) to `target` spacing (or to `shape`), for the MONAI baselines,
    which need one voxel size across patients (MONAI Label's radiology app resamples to a fixed spacing)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array.astype(np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing))
    if shape is None:
        shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(array.shape[::-1], spacing, target))[::-1]
        out_spacing = target
    else:
        out_spacing = tuple(n * s / m for n, s, m in zip(array.shape[::-1], spacing, shape[::-1]))
    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputSpacing(tuple(float(s) for s in out_spacing))
    resampler.SetSize([int(n) for n in shape[::-1]])
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0 if nearest else -1024)
    return sitk.GetArrayFromImage(resampler.Execute(img))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred > 0, truth > 0
    denominator = p.sum() + t.sum()
    return 1.0 if denominator == 0 else float(2 * (p & t).sum() / denominator)


# ------------------------------------------------------------------------------------------------ our model
def pretrain(patients: dict, plan: Plan, work: Path, device) -> Path:
    """The backbone, pretrained label-free on every slice of both patients (as the server pretrains on all
    datastore images, labeled or not)."""
    from fasttextdiff.config import BackboneConfig
    from fasttextdiff.training.workflows import pretrain_backbone_on_files
    from fasttextdiff.data.io import write_image

    out = work / "backbone"
    if (out / "config.json").exists():
        print(f"reusing the backbone in {out}", flush=True)
        return out
    files = []
    for name, patient in patients.items():
        files.append(write_image(work / "pretrain" / f"{name}.nii.gz", patient.image.array.astype(np.float32),
                                 patient.image))
    cfg = BackboneConfig(image_size=plan.size, block_out_channels=plan.widths, window=plan.window, noise_seed=0)
    pretrain_backbone_on_files(files, cfg, out, epochs=10_000, max_steps=plan.pretrain_steps, batch_size=16,
                               lr=1e-3, ema_decay=0.99, seed=0, device=device, progress=True, resume=False,
                               max_slices_per_volume=None)
    return out


def train_ours(method: str, samples: list, backbone: Path, plan: Plan, seed: int, work: Path, device):
    from fasttextdiff.config import FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.inference.pipeline import Segmenter
    from fasttextdiff.training.segmenter import train_segmenter

    seg = SegmenterConfig(use_text=method != "no_text", fusion=FusionConfig(text_residual="zero"))
    items = sum(len(s.slices) for s in samples)
    epochs = max(1, math.ceil(plan.steps / math.ceil(items / plan.batch_size)))
    cfg = TrainConfig(epochs=epochs, batch_size=plan.batch_size, lr=1e-3, seed=seed, text_fallback=False,
                      val_noise_draws=plan.n_noise)
    out = work / f"model_{method}_{seed}"
    t0 = time.perf_counter()
    train_segmenter(samples, out, backbone_dir=backbone, text_config=TextConfig(encoder="tiny"), segmenter_config=seg,
                    train_config=cfg, device=device, progress=False, text_cache_dir=work / "text_cache", resume=False)
    seconds = time.perf_counter() - t0
    return Segmenter.load(out, device=device, n_noise=plan.n_noise), seconds


# ------------------------------------------------------------------------------------------------ tasks
def anatomy(train, test, structures: list[str], plan: Plan, budget: float, seed: int, backbone: Path, work: Path,
            device) -> list[dict]:
    """One row per method: 3D Dice per structure on the test patient, the mean, and the left/right check."""
    from fasttextdiff.data import real_ct

    rng = np.random.default_rng(seed)
    numbers = {name: k for k, name in train.names.items()}
    test_numbers = {name: k for k, name in test.names.items()}
    zs = labeled_slices(train.image.array.shape[0], budget, seed)
    rows = []
    pairs = {s: s.replace("_left", "_right") if "_left" in s else s.replace("_right", "_left") for s in structures
             if ("_left" in s or "_right" in s)}
    pairs = {s: o for s, o in pairs.items() if o in structures}
    for method in plan.methods:
        t0 = time.perf_counter()
        if method in ("fasttextdiff", "no_text"):
            # several phrasings per structure (the test asks with phrasings of its own): the text must be read
            # for what it names, not memorised as one string per structure
            texts = {f"{s}#{k}": real_ct.anatomy_report(s, rng) for s in structures for k in range(plan.phrasings)}
            masks = {key: train.labels == numbers[key.split("#")[0]] for key in texts}
            samples = volume_samples(work / f"anatomy_{seed}_{budget}", train.image.array, train.image, masks, texts,
                                     zs, "train")
            segmenter, train_s = train_ours(method, samples, backbone, plan, seed, work, device)
            preds = {s: segmenter.segment(test.image, real_ct.anatomy_report(s, np.random.default_rng(seed + 99)))
                     .mask for s in structures}
            shutil.rmtree(work / f"anatomy_{seed}_{budget}", ignore_errors=True)
        else:
            target = np.zeros(train.labels.shape, np.int64)
            for k, s in enumerate(structures, start=1):
                target[train.labels == numbers[s]] = k
            pred = baseline(method, train, target, test, len(structures) + 1, zs, plan, seed)
            train_s = pred.pop("seconds")
            preds = {s: pred["labels"] == k for k, s in enumerate(structures, start=1)}
        per = {s: dice(preds[s], test.labels == test_numbers[s]) for s in structures}
        side = {s: dice(preds[s], test.labels == test_numbers[o]) for s, o in pairs.items()}
        rows.append({"task": "anatomy", "method": method, "budget": budget, "seed": seed, "train": train.name,
                     "test": test.name, "labeled_slices": len(zs), "train_seconds": round(train_s, 1),
                     "seconds": round(time.perf_counter() - t0, 1), "dice_per_structure": per,
                     "mean_dice": float(np.mean(list(per.values()))),
                     "named_side_dice": float(np.mean([per[s] for s in pairs])) if pairs else None,
                     "other_side_dice": float(np.mean(list(side.values()))) if side else None})
        print(f"anatomy {train.name}->{test.name} {method:14s} budget {budget:.2f} seed {seed}: mean Dice "
              f"{rows[-1]['mean_dice']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def lesion_cases(patient, plan: Plan, seed: int) -> list[dict]:
    from fasttextdiff.data import real_ct

    cases = []
    for v in range(plan.lesion_variants):
        rng = np.random.default_rng(1000 * seed + 17 * v + ord(patient.name))
        array, instances, lesions = real_ct.insert_lesions(patient, rng)
        named = [les.label for les in lesions if les.named]
        cases.append({"array": array, "instances": instances, "named": named,
                      "target": np.isin(instances, named), "report": real_ct.lesion_report(lesions, patient, rng)})
    return cases


def lesions(train, test, plan: Plan, budget: float, seed: int, backbone: Path, work: Path, device) -> list[dict]:
    from fasttextdiff.data.io import Image
    from fasttextdiff.inference.postprocess import drop_small_components

    train_cases, test_cases = lesion_cases(train, plan, seed), lesion_cases(test, plan, seed + 500)
    zs = labeled_slices(train.image.array.shape[0], budget, seed)
    rows = []
    for method in plan.methods:
        t0 = time.perf_counter()
        if method in ("fasttextdiff", "no_text"):
            samples = []
            for v, case in enumerate(train_cases):
                samples += volume_samples(work / f"lesions_{seed}_{budget}", case["array"], train.image,
                                          {"named": case["target"]}, {"named": case["report"]}, zs, f"v{v}")
            segmenter, train_s = train_ours(method, samples, backbone, plan, seed, work, device)
            preds = [segmenter.segment(Image(c["array"], test.image.spacing, test.image.origin, test.image.direction,
                                             True), c["report"]).mask for c in test_cases]
            shutil.rmtree(work / f"lesions_{seed}_{budget}", ignore_errors=True)
        else:
            stacked = [(c["array"], c["target"].astype(np.int64)) for c in train_cases]
            fitted = baseline(method, train, None, None, 2, zs, plan, seed, volumes=stacked)
            train_s = fitted.pop("seconds")
            preds = [predict_baseline(fitted, c["array"], test) > 0 for c in test_cases]
        variants = [(method, preds)]
        if method in ("fasttextdiff", "no_text"):  # the 3D clean-up, on the same predictions
            variants.append((f"{method}+clean3d", [drop_small_components(p, test.image.spacing) for p in preds]))
        for name, masks in variants:
            rows.append({**score_lesions(masks, test_cases), "task": "lesions", "method": name, "budget": budget,
                         "seed": seed, "train": train.name, "test": test.name, "labeled_slices": len(zs),
                         "train_seconds": round(train_s, 1), "seconds": round(time.perf_counter() - t0, 1),
                         "reports": [c["report"] for c in test_cases]})
            r = rows[-1]
            print(f"lesions {train.name}->{test.name} {name:20s} budget {budget:.2f} seed {seed}: Dice "
                  f"{r['mean_dice']:.3f}, found {r['found']}/{r['named_lesions']}, FP/vol "
                  f"{r['fp_components_per_volume']:.1f} ({r['seconds']:.0f} s)", flush=True)
    return rows


def score_lesions(preds: list, cases: list[dict]) -> dict:
    from fasttextdiff.utils.metrics import lesion_detection

    scores = [dice(p, c["target"]) for p, c in zip(preds, cases)]
    detections = [lesion_detection(p, c["instances"], c["named"]) for p, c in zip(preds, cases)]
    found, total = sum(d["found"] for d in detections), sum(d["lesions"] for d in detections)
    return {"dice_per_volume": scores, "mean_dice": float(np.mean(scores)), "found": found, "named_lesions": total,
            "detection_rate": found / total if total else None,
            "fp_components_per_volume": float(np.mean([d["fp_components"] for d in detections]))}


# ------------------------------------------------------------------------------------------------ MONAI baselines
BASELINE_SPACING = (3.0, 3.0, 3.0)  # patient A's voxel size; B is resampled to it (and predictions back)


def baseline(method: str, train, target, test, num_classes: int, zs: list[int], plan: Plan, seed: int,
             volumes: list | None = None) -> dict:
    """Train a MONAI baseline on the training patient's labeled slab, resampled to one voxel size (as MONAI
    Label's radiology app does); with `test`, predict it too, back in the test volume's own grid."""
    import monai_baselines

    spacing = tuple(train.image.spacing)
    volumes = volumes if volumes is not None else [(train.image.array, target)]
    slab = slice(min(zs), max(zs) + 1)  # labeled_slices gives one contiguous slab
    images = [resample(v[slab], spacing, BASELINE_SPACING, nearest=False) for v, _ in volumes]
    labels = [resample(t[slab], spacing, BASELINE_SPACING, nearest=True).astype(np.int64) for _, t in volumes]
    fit_kwargs = {"budget_s": 3600.0, "max_steps": plan.baseline_steps, "seed": seed, "window": plan.window}
    if method == "monai_unet3d":
        result = monai_baselines.train_unet3d(images, labels, num_classes, **fit_kwargs)
    else:
        result = monai_baselines.train_unet2d(images, labels, num_classes, size=plan.size, **fit_kwargs)
    fitted = {"result": result, "seconds": result.seconds}
    if test is not None:
        fitted["labels"] = predict_baseline(fitted, test.image.array, test)
    return fitted


def predict_baseline(fitted: dict, array: np.ndarray, test) -> np.ndarray:
    src = tuple(test.image.spacing)
    labels = fitted["result"].predict(resample(array, src, BASELINE_SPACING, nearest=False))
    return resample(labels, BASELINE_SPACING, src, nearest=True, shape=array.shape).astype(np.int64)


# ------------------------------------------------------------------------------------------------ summary
def summarize(rows: list[dict]) -> dict:
    """The acceptance keys per method and budget (means over seeds and directions)."""
    out: dict = {}
    for task, key in (("anatomy", "mean_dice"), ("lesions", "mean_dice")):
        for r in rows:
            if r["task"] != task:
                continue
            cell = out.setdefault(f"{r['budget']:g}", {}).setdefault(r["method"], {})
            cell.setdefault(f"{task}_dice", []).append(r[key])
            if task == "lesions":
                cell.setdefault("detection", []).append(r["detection_rate"])
                cell.setdefault("fp", []).append(r["fp_components_per_volume"])
            else:
                cell.setdefault("structures", []).append(r["dice_per_structure"])
    summary = {}
    for budget, methods in out.items():
        def mean(method, key):
            values = [v for v in methods.get(method, {}).get(key, []) if v is not None]
            return float(np.mean(values)) if values else None

        baselines = [m for m in methods if m.startswith("monai_")]
        best_anatomy = max((mean(m, "anatomy_dice") or 0 for m in baselines), default=None)
        best_lesion = max((mean(m, "lesions_dice") or 0 for m in baselines), default=None)
        per_method = {m: {"anatomy_mean_dice": mean(m, "anatomy_dice"), "lesion_dice": mean(m, "lesions_dice"),
                          "lesion_detection_rate": mean(m, "detection"),
                          "fp_components_per_volume": mean(m, "fp")} for m in methods}
        ours, plain = per_method.get("fasttextdiff", {}), per_method.get("no_text", {})
        summary[budget] = {
            "methods": per_method,
            "anatomy_mean_dice": ours.get("anatomy_mean_dice"),
            "anatomy_mean_dice_baseline": best_anatomy,
            "lesion_text_gap": (ours["lesion_dice"] - plain["lesion_dice"])
            if ours.get("lesion_dice") is not None and plain.get("lesion_dice") is not None else None,
            "lesion_over_best_baseline": (ours["lesion_dice"] - best_lesion)
            if ours.get("lesion_dice") is not None and best_lesion is not None else None,
            "lesion_detection_rate": ours.get("lesion_detection_rate"),
            "fp_components_per_volume": ours.get("fp_components_per_volume"),
        }
    return summary


def markdown(result: dict) -> str:
    lines = [f"# Real CT ({result['mode']})", "", result["note"], "",
             f"Machine: {result['machine']['cpu']} ({result['machine']['cpu_isa']}), "
             f"{result['seconds'] / 60:.1f} min. Command: `{result['command']}`", ""]
    headers = ["budget", "method", "anatomy mean Dice", "lesion Dice", "named lesions found", "FP comp./volume"]
    table = []
    for budget, s in sorted(result["summary"].items(), key=lambda kv: float(kv[0])):
        for method, m in s["methods"].items():
            table.append([f"{float(budget):.0%}", method] + [
                "-" if m[k] is None else f"{m[k]:.3f}" if k != "lesion_detection_rate" else f"{m[k]:.0%}"
                for k in ("anatomy_mean_dice", "lesion_dice", "lesion_detection_rate", "fp_components_per_volume")])
    lines += [common.markdown_table(headers, table), ""]
    full = max(result["summary"], key=float)
    per = {}
    for r in result["rows"]:
        if r["task"] == "anatomy" and f"{r['budget']:g}" == full:
            for s, d in r["dice_per_structure"].items():
                per.setdefault(s, {}).setdefault(r["method"], []).append(d)
    if per:
        methods = sorted({m for v in per.values() for m in v})
        lines += [f"3D Dice per structure at budget {float(full):.0%}:", "",
                  common.markdown_table(["structure"] + methods,
                                        [[s] + [f"{np.mean(v[m]):.2f}" if m in v else "-" for m in methods]
                                         for s, v in sorted(per.items())]), ""]
    lines += ["Goals: " + "; ".join(result["goals_check"]), ""]
    return "\n".join(lines)


def goals_check(summary: dict, rows: list[dict]) -> list[str]:
    full = summary[max(summary, key=float)]
    out = []
    a, b = full.get("anatomy_mean_dice"), full.get("anatomy_mean_dice_baseline")
    if a is not None and b is not None:
        out.append(f"anatomy mean Dice {a:.3f} vs best MONAI baseline {b:.3f}: {'met' if a >= b else 'missed'}")
    gap = full.get("lesion_text_gap")
    if gap is not None:
        out.append(f"lesion text gap {gap:+.3f} (goal >= +0.20): {'met' if gap >= 0.2 else 'missed'}")
    det, fp = full.get("lesion_detection_rate"), full.get("fp_components_per_volume")
    if det is not None:
        out.append(f"named lesions found {det:.0%} (goal >= 80 %), FP components/volume {fp:.2f} (goal <= 0.5)")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="A -> B, budgets 25/100 %%, one seed (<= 20 min)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--methods", nargs="+", help="a subset of the methods")
    parser.add_argument("--tasks", nargs="+", default=["anatomy", "lesions"], choices=["anatomy", "lesions"])
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    parser.add_argument("--window", help="HU window 'center,width' of the backbone (default: the soft-tissue "
                        "window, 50,350; the lung window is -600,1500)")
    parser.add_argument("--budgets", type=float, nargs="+", help="override the labeled shares, e.g. 1.0")
    parser.add_argument("--name", help="result file name (default real_ct_quick / real_ct)")
    parser.add_argument("--steps", type=int, help="fusion + head optimiser steps (quick: 250)")
    parser.add_argument("--lesion-variants", type=int, help="lesion copies of each patient (quick: 3)")
    parser.add_argument("--server", action="store_true", help="the served default model instead: import-studies of "
                        "A (liver labeled) and B, make serve's defaults, B's liver through /infer")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    if args.server:
        args.out.mkdir(parents=True, exist_ok=True)
        return served(args)
    from fasttextdiff.data import real_ct

    plan = Plan()
    if not args.quick:
        plan = Plan(directions=[("A", "B"), ("B", "A")], budgets=[0.1, 0.25, 1.0], seeds=[0, 1, 2],
                    pretrain_steps=800, steps=600, n_noise=4, baseline_steps=600, structures=None)
    if args.seeds:
        plan.seeds = args.seeds
    if args.methods:
        plan.methods = tuple(args.methods)
    if args.window:
        plan.window = tuple(float(v) for v in args.window.split(","))
    if args.budgets:
        plan.budgets = args.budgets
    if args.steps:
        plan.steps = plan.baseline_steps = args.steps
    if args.lesion_variants:
        plan.lesion_variants = args.lesion_variants
    started = time.time()
    device = "cpu"
    patients = {n: real_ct.load_patient(n) for n in sorted({p for d in plan.directions for p in d})}
    structures = real_ct.shared_structures(patients["A"], patients["B"])
    if plan.structures:
        structures = [s for s in structures if s in plan.structures]
    work = args.work or Path(tempfile.mkdtemp(prefix="fasttextdiff-real-ct-"))
    rows: list[dict] = []
    try:
        backbone = pretrain(patients, plan, work, device)
        for train_name, test_name in plan.directions:
            for seed in plan.seeds:
                for budget in plan.budgets:
                    if "anatomy" in args.tasks:
                        rows += anatomy(patients[train_name], patients[test_name], structures, plan, budget, seed,
                                        backbone, work, device)
                    if "lesions" in args.tasks:
                        rows += lesions(patients[train_name], patients[test_name], plan, budget, seed, backbone,
                                        work, device)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarize(rows)
    name = args.name or (f"{RESULT_NAME}_quick" if args.quick else RESULT_NAME)
    command = " ".join(["python bench/real_ct.py", *(argv if argv is not None else sys.argv[1:])])
    result = {"mode": "quick" if args.quick else "full", "command": command,
              "seconds": round(time.time() - started, 1),
              "machine": common.machine_info(device), "plan": {k: v for k, v in plan.__dict__.items()},
              "structures": structures, "note": "References are TotalSegmentator's own outputs, not expert masks; "
              "lesions are synthetic, inserted into the real scans. 3D Dice per test volume in its own grid.",
              "summary": summary, "rows": rows}
    result["goals_check"] = goals_check(summary, rows) if summary else []
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / f"{name}.json", result)
    common.write_text(args.out / f"{name}.md", markdown(result))
    plot(result, args.out / f"{name}.png")
    print(json.dumps({k: result["summary"][k] for k in result["summary"]}, indent=1, default=str)[:3000])
    return result


def served(args) -> dict:
    """What `make serve` builds on a studies folder of these scans: `import-studies` from a folder with A (liver
    labeled, as `A_label.nii.gz`) and B, each with the report "The liver."; the server with its defaults builds
    the default model from A; B's liver is segmented through `/infer` and scored per volume, and `/info`'s
    validation Dice is compared with the one recomputed from the served mask of the validation volume."""
    import urllib.request

    import load
    from fasttextdiff.commands.main import main as cli
    from fasttextdiff.data import real_ct
    from fasttextdiff.data.io import read_image, write_image

    work = args.work or Path(tempfile.mkdtemp(prefix="fasttextdiff-real-ct-server-"))
    source, studies = work / "source", work / "studies"
    source.mkdir(parents=True, exist_ok=True)
    truths = {}
    for name in ("A", "B"):
        patient = real_ct.load_patient(name)
        liver = patient.labels == {n: k for k, n in patient.names.items()}["liver"]
        write_image(source / f"{name}.nii.gz", patient.image.array.astype(np.int16), patient.image)
        (source / f"{name}.txt").write_text("The liver.\n", encoding="utf-8")
        truths[name] = liver
        if name == "A":
            write_image(source / "A_label.nii.gz", liver.astype(np.uint8), patient.image)
    if cli(["import-studies", str(source), "--out", str(studies)]) != 0:
        raise SystemExit("import-studies failed")
    started = time.time()
    proc, url = load.start_server(studies, [], work / "server.log", timeout=1800)
    try:
        ready_s = time.time() - started
        with urllib.request.urlopen(f"{url}/info/", timeout=30) as r:  # noqa: S310 - loopback
            info = json.loads(r.read())["models"]["fasttextdiff"]
        dice_of = {}
        for name in ("A", "B"):
            request = urllib.request.Request(f"{url}/infer/fasttextdiff?image={name}&output=image", method="POST",
                                             data=b"")
            t0 = time.time()
            with urllib.request.urlopen(request, timeout=600) as r:  # noqa: S310 - loopback
                out = work / f"served_{name}.nii.gz"
                out.write_bytes(r.read())
            mask = read_image(out).array
            dice_of[name] = {"dice": dice(mask, truths[name]), "seconds": round(time.time() - t0, 1),
                             "predicted_voxels": int((mask > 0).sum()), "reference_voxels": int(truths[name].sum())}
    finally:
        load.stop_server(proc)
    result = {"command": "python bench/real_ct.py --server", "ready_seconds": round(ready_s, 1),
              "machine": common.machine_info("cpu"), "val_dice_info": info.get("val_dice"),
              "val_images": info.get("val_images"), "val_metric": info.get("val_metric"),
              "image_size": info.get("image_size"), "window": info.get("window"),
              "window_reason": (info.get("geometry_choice") or {}).get("window_reason"), "served": dice_of,
              "note": "A labeled (liver) trains and, as the only labeled volume, also validates; B is unlabeled and "
                      "scored against TotalSegmentator's reference (not an expert mask)."}
    common.write_json(args.out / "real_ct_server.json", result)
    print(json.dumps(result, indent=1, default=str))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(result["summary"], key=float)
    panels = [(key, title) for key, title in (("anatomy_mean_dice", "anatomy by text: mean 3D Dice"),
                                              ("lesion_dice", "named lesions: 3D Dice per volume"))
              if any(m.get(key) is not None for b in budgets for m in result["summary"][b]["methods"].values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        methods = sorted({m for b in budgets for m in result["summary"][b]["methods"]
                          if result["summary"][b]["methods"][m].get(key) is not None})
        for method in methods:
            ys = [result["summary"][b]["methods"].get(method, {}).get(key) for b in budgets]
            xs = [100 * float(b) for b, y in zip(budgets, ys) if y is not None]
            ax.plot(xs, [y for y in ys if y is not None], marker="o", label=method)
        ax.set_xlabel("labeled slices of the training patient (%)")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 105)
    axes[0][0].legend(fontsize=8)
    common.savefig(fig, path)


if __name__ == "__main__":
    main()

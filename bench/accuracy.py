"""Label efficiency: FastTextDiff against its ablations and a supervised MONAI U-Net, side by side.

Methods (all on the same splits, the same nested labeled subsets and the same frozen backbone):
  fasttextdiff  report-conditioned, the ModernBERT encoder ("tiny": a small random-init ModernBERT
                with the real WordPiece vocabulary - no ModernBERT weights can be had offline)
  no_text       the same network with the text branch removed (the ablation)
  bert_text     the same network with a real pretrained BERT-type encoder (all-MiniLM-L6-v2): the
                TextDiff role
  unet          a supervised MONAI UNet of comparable size trained from scratch on the labeled images
                only (what a user would pick instead); same loss, optimiser and step budget; flips /
                90-degree turns / +-20 degree rotation on or off, chosen per run on the validation split

Datasets:
  text-necessary  synthetic chest X-rays where only the lesions the report names are labeled
  clinical-reports the same cases with radiology-style reports (FINDINGS/IMPRESSION, synonyms,
                  negations, real IU X-ray sentences as distractors; held-out phrasings in Test)
  synthetic       the standard synthetic LViT-style set (every lesion labeled and named)
  nuclei          the real fluorescence nuclei image + expert mask, tiled (bench/nuclei.py)
  lvit            any LViT-layout folder (--path): QaTa-COV19, MosMedData+, MoNuSeg

Protocol: one backbone per dataset, pretrained without labels on the train+val images (never the
test images); for every seed and labeled fraction each method trains on the same subset
(`select_labeled` is seeded and nested) for the same number of optimiser steps (epochs are raised
for tiny subsets so every run gets at least `min_steps` steps), keeps the checkpoint with the best
validation Dice, and is scored once on the test split (per-image Dice/IoU at the mask's resolution).
Nothing is tuned on the test split.

    python bench/accuracy.py --dataset text-necessary --quick
    python bench/accuracy.py --dataset nuclei --quick
    python bench/accuracy.py --dataset text-necessary            # full: 5/10/25/50/100 %, 3 seeds
    python bench/accuracy.py --dataset lvit --path /data/QaTa-COV19 --paper-scale --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import common
from common import mean_std
from fasttextdiff.config import TrainConfig

METHODS = ("fasttextdiff", "no_text", "bert_text", "unet")
DATASETS = ("text-necessary", "clinical-reports", "synthetic", "nuclei", "lvit")


@dataclass(frozen=True)
class Plan:
    size: int = 64
    n_train: int = 64
    n_val: int = 16
    n_test: int = 32
    widths: tuple[int, ...] = (16, 32, 64)
    timesteps: tuple[int, ...] = (50, 150, 250)
    pretrain_steps: int = 150
    pretrain_batch: int = 8
    epochs: int = 40
    # at least this many optimiser steps per run, for every method: chosen on the VALIDATION split of the
    # text-necessary set at 10 % labels (13 images): 80 steps gave val Dice 0.56 (text) / 0.56 (no_text),
    # 240 steps 0.62 / 0.54, 400 steps 0.62 (best checkpoint at step 240); the test split played no part.
    min_steps: int = 240
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    fusion_dim: int = 32
    budgets: tuple[float, ...] = (0.1, 0.25, 1.0)
    seeds: tuple[int, ...] = (0,)
    val_checks: int = 10  # validations per run (val_every = epochs // val_checks)
    methods: tuple[str, ...] = METHODS
    unet_augment: tuple[bool, ...] = (False, True)  # candidates, chosen on validation Dice
    # the text path (FusionConfig.text_residual / text_dropout) for the text methods; None = the library default
    text_residual: str | None = None
    text_dropout: float | None = None
    text_fallback: bool | None = None  # TrainConfig.text_fallback for the text methods


# QUICK follows fasttextdiff.experiments.ablation.QUICK (64 px, widths 16/32/64, 150 pretraining steps, 40 epochs) on a
# 128-image training split, so its 50 % point trains on as many images as the ablation (64). With 64 training
# images, 10 % is 6 images: too few for the text branch to learn six location words (validation Dice 0.50 with
# text vs 0.46 without, training loss 0.06 - memorised; longer training did not change it).
QUICK = Plan(n_train=128, n_val=32, n_test=64, budgets=(0.1, 0.25, 0.5))
FULL = Plan(n_train=128, n_val=32, n_test=64, pretrain_steps=400, budgets=(0.05, 0.1, 0.25, 0.5, 1.0),
            seeds=(0, 1, 2))
# The paper's settings (256 px, t = 50/150/250, 50 epochs, lr 1e-4): a GPU run on a real dataset.
PAPER = Plan(size=256, widths=(64, 128, 256, 256), pretrain_steps=20_000, pretrain_batch=16, epochs=50,
             min_steps=0, lr=1e-4, fusion_dim=256, budgets=(0.05, 0.1, 0.25, 0.5, 1.0), seeds=(0, 1, 2))


def epochs_for(plan: Plan, n_labeled: int) -> int:
    steps_per_epoch = math.ceil(n_labeled / plan.batch_size)
    return max(plan.epochs, math.ceil(plan.min_steps / steps_per_epoch))


# ------------------------------------------------------------------------------------------------
# data and backbone
# ------------------------------------------------------------------------------------------------


def prepare_data(args, plan: Plan, work: Path) -> tuple[Path, Plan, tuple | None, str]:
    """-> (LViT root, plan with the real split sizes, intensity window, dataset description)."""
    from fasttextdiff.data.synthetic import make_lvit_dataset

    if args.dataset in ("text-necessary", "clinical-reports", "synthetic"):
        variant = "standard" if args.dataset == "synthetic" else args.dataset
        root = make_lvit_dataset(work / "data", variant=variant, n_train=plan.n_train, n_val=plan.n_val,
                                 n_test=plan.n_test, size=plan.size, seed=args.data_seed)
        return root, plan, None, f"synthetic {variant} ({plan.size} px, data seed {args.data_seed})"
    if args.dataset == "nuclei":
        import nuclei

        root = nuclei.make_nuclei_dataset(work / "data", tile=plan.size)
        return root, plan, nuclei.WINDOW, (f"real fluorescence nuclei (DSB 2018 image in the stardist wheel), "
                                           f"{plan.size} px non-overlapping tiles")
    if not args.path:
        raise SystemExit("--dataset lvit needs --path to an LViT-layout folder")
    return Path(args.path), plan, None, f"LViT layout at {args.path}"


def pretrain(root: Path, splits: dict, plan: Plan, window, work: Path, device) -> tuple[Path, float]:
    from fasttextdiff.config import BackboneConfig
    from fasttextdiff.training.workflows import pretrain_backbone_on_files

    cfg = BackboneConfig(image_size=plan.size, block_out_channels=plan.widths, timesteps=plan.timesteps,
                         window=window, noise_seed=0)
    paths = [s.image for split in ("train", "val") for s in splits.get(split, [])]  # never the test images
    t0 = time.perf_counter()
    pretrain_backbone_on_files(paths, cfg, work / "backbone", epochs=10_000, max_steps=plan.pretrain_steps,
                               batch_size=plan.pretrain_batch, seed=0, device=device, progress=False, resume=False)
    return work / "backbone", time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------


def fusion_config(plan: Plan):
    from fasttextdiff.config import FusionConfig

    text_path = {k: v for k,
                 v in (("text_residual", plan.text_residual), ("text_dropout", plan.text_dropout)) if v is not None}
    return FusionConfig(dim=plan.fusion_dim, heads=4, **text_path)


def run_fasttextdiff(method: str, splits, backbone_dir: Path, plan: Plan, fraction: float, seed: int, work: Path,
                     device, text_config=None, encoder_label: str | None = None) -> dict:
    """`text_config` overrides the method's encoder (bench/text_encoders.py compares several)."""
    from fasttextdiff.config import SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.data.dataset import select_labeled
    from fasttextdiff.inference.evaluate import evaluate_model
    from fasttextdiff.training.segmenter import train_segmenter

    encoder = str(common.minilm_path()) if method == "bert_text" else "tiny"
    text_config = text_config or TextConfig(encoder=encoder)
    n_labeled = len(select_labeled(splits["train"], fraction if fraction < 1 else None, seed=seed))
    epochs = epochs_for(plan, n_labeled)
    seg = SegmenterConfig(use_text=method != "no_text", fusion=fusion_config(plan))
    fallback = {} if plan.text_fallback is None or method == "no_text" else {"text_fallback": plan.text_fallback}
    train_cfg = TrainConfig(epochs=epochs, batch_size=plan.batch_size, lr=plan.lr, seed=seed,
                            labeled=fraction if fraction < 1 else None,
                            val_every=max(1, epochs // plan.val_checks), **fallback)
    out = work / "models" / f"{method}_{fraction}_{seed}"
    t0 = time.perf_counter()
    metrics = train_segmenter(splits["train"], out, backbone_dir=backbone_dir, text_config=text_config,
                              segmenter_config=seg, train_config=train_cfg, val_samples=splits["val"], device=device,
                              progress=False, text_cache_dir=work / "text_cache")
    train_s = time.perf_counter() - t0
    scores = evaluate_model(out, splits["test"], device=device, n_noise=1, progress=False)
    shutil.rmtree(out, ignore_errors=True)
    return {"val_dice": metrics.get("best_val_dice"), "best_epoch": metrics.get("best_epoch"), "epochs": epochs,
            "labeled_images": metrics["labeled_images"], "trainable_parameters": metrics["trainable_parameters"],
            "feature_cache": metrics["feature_cache"], "train_seconds": round(train_s, 2),
            "dice": scores["dice_mean"], "iou": scores["iou_mean"], "n_test": scores["n"],
            "text_encoder": "none" if method == "no_text" else encoder_label or (
                "minilm" if method == "bert_text" else "tiny-modernbert"),
            "fusion": {"text_residual": seg.fusion.text_residual, "text_dropout": seg.fusion.text_dropout,
                       "text_fallback": train_cfg.text_fallback} if seg.use_text else None,
            "text_fallback_chose": metrics.get("text_fallback")}


def run_unet(splits, plan: Plan, fraction: float, seed: int, window) -> dict:
    import baselines
    from fasttextdiff.data.dataset import select_labeled

    n_labeled = len(select_labeled(splits["train"], fraction if fraction < 1 else None, seed=seed))
    epochs = epochs_for(plan, n_labeled)
    candidates = []
    t0 = time.perf_counter()
    for augment in plan.unet_augment:
        net, info = baselines.train_unet(splits["train"], size=plan.size, channels=1, widths=plan.widths,
                                         labeled=fraction if fraction < 1 else None, seed=seed, epochs=epochs,
                                         batch_size=plan.batch_size, lr=plan.lr, augment=augment,
                                         val_samples=splits["val"], val_every=max(1, epochs // plan.val_checks),
                                         window=window)
        candidates.append((info["best_val_dice"], augment, net, info))
    train_s = time.perf_counter() - t0
    val, augment, net, info = max(candidates, key=lambda c: c[0])  # validation split decides, never test
    scores = baselines.evaluate_unet(net, splits["test"], size=plan.size, channels=1, window=window)
    return {"val_dice": val, "best_epoch": info["best_epoch"], "epochs": epochs,
            "labeled_images": info["labeled_images"],
            "trainable_parameters": info["parameters"], "augment": augment,
            "val_dice_by_augment": {str(c[1]).lower(): c[0] for c in candidates},
            "train_seconds": round(train_s, 2), "dice": scores["dice_mean"], "iou": scores["iou_mean"],
            "n_test": scores["n"]}


# ------------------------------------------------------------------------------------------------
# aggregation, acceptance, outputs
# ------------------------------------------------------------------------------------------------


def aggregate(runs: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["method"], r["labeled_fraction"]) for r in runs}, key=lambda k: (METHODS.index(k[0]), k[1]))
    for method, fraction in keys:
        group = [r for r in runs if r["method"] == method and r["labeled_fraction"] == fraction]
        dm, ds = mean_std([r["dice"] for r in group])
        im, is_ = mean_std([r["iou"] for r in group])
        out.append({"method": method, "labeled_fraction": fraction, "labeled_images": group[0]["labeled_images"],
                    "dice_mean": dm, "dice_std": ds, "iou_mean": im, "iou_std": is_,
                    "seeds": [r["seed"] for r in group],
                    "val_dice_mean": mean_std([r["val_dice"] for r in group if r["val_dice"] is not None])[0],
                    "train_seconds_mean": mean_std([r["train_seconds"] for r in group])[0]})
    return out


def acceptance(dataset: str, results: list[dict]) -> dict:
    """The label-efficiency criterion, evaluated on what was measured (budgets <= 25 %); on nuclei also
    "a text path that only helps": fasttextdiff >= no_text - 0.005 Dice at every budget."""
    table = {(r["method"], r["labeled_fraction"]): r for r in results}
    low = sorted({f for _, f in table if f <= 0.25 + 1e-9})
    checks = []
    if dataset == "nuclei":
        for f in sorted({f for _, f in table}):
            if ("fasttextdiff", f) in table and ("no_text", f) in table:
                gap = table[("fasttextdiff", f)]["dice_mean"] - table[("no_text", f)]["dice_mean"]
                checks.append({"labeled_fraction": f,
                               "claim": "fasttextdiff >= no_text - 0.005 Dice (a text path that only helps)",
                               "dice_gap": gap, "holds": gap >= -0.005})
    for f in low:
        ours = table.get(("fasttextdiff", f))
        if ours is None:
            continue
        if dataset in ("text-necessary", "clinical-reports"):
            for other in ("no_text", "unet"):
                if (other, f) in table:
                    gap = ours["dice_mean"] - table[(other, f)]["dice_mean"]
                    checks.append({"labeled_fraction": f, "claim": f"fasttextdiff > {other}", "dice_gap": gap,
                                   "holds": gap > 0})
        elif dataset == "nuclei" and ("unet", f) in table:
            gap = ours["dice_mean"] - table[("unet", f)]["dice_mean"]
            checks.append({"labeled_fraction": f, "claim": "fasttextdiff >= unet - 0.02 Dice", "dice_gap": gap,
                           "holds": gap >= -0.02})
    return {"checks": checks, "all_hold": all(c["holds"] for c in checks) if checks else None}


def pivot_table(result: dict, metric: str = "dice") -> str:
    """Budgets down, methods across: the curve as one compact table (the README quotes it)."""
    table = {(r["method"], r["labeled_fraction"]): r for r in result["results"]}
    methods = [m for m in METHODS if any(k[0] == m for k in table)]
    fractions = sorted({k[1] for k in table})
    rows = []
    for f in fractions:
        images = next(table[(m, f)]["labeled_images"] for m in methods if (m, f) in table)
        cells = [f"{100 * f:g} % ({images})"]
        for m in methods:
            r = table.get((m, f))
            cells.append(f"{r[metric + '_mean']:.3f} ± {r[metric + '_std']:.3f}" if r else "")
        rows.append(cells)
    return common.markdown_table(["labeled (images)"] + methods, rows, ["---"] + ["---:"] * len(methods))


def markdown(result: dict) -> str:
    lines = [f"# Label efficiency: {result['dataset']}", "",
             f"Command: `{result['command']}`  ",
             f"Data: {result['description']}; splits train/val/test = {result['split_sizes']}.  ",
             f"Machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} torch thread(s), "
             f"load average at start {result['machine']['loadavg_start']}, at end {result['loadavg_end']} "
             f"(a shared machine: seconds are noisy, Dice is not).  ",
             f"Seeds: {list(result['plan']['seeds'])}; wall time {result['seconds'] / 60:.1f} min"
             + (" (`--quick`: fewer budgets/seeds than the full run)." if result["quick"] else ".")
             + (f" Merged from {len(result['merged_from'])} result files run side by side (wall time: the longest)."
                if result.get("merged_from") else ""), ""]
    lines += ["Test Dice, mean ± std over seeds (rows: labeled share of the training split):", "", pivot_table(result),
              "",
              "All runs:", ""]
    rows = []
    for r in result["results"]:
        rows.append([r["method"], f"{100 * r['labeled_fraction']:g} %", r["labeled_images"],
                     f"{r['dice_mean']:.3f} ± {r['dice_std']:.3f}", f"{r['iou_mean']:.3f} ± {r['iou_std']:.3f}",
                     f"{r['val_dice_mean']:.3f}", len(r["seeds"]), f"{r['train_seconds_mean']:.0f}"])
    lines.append(common.markdown_table(
        ["method", "labeled", "images", "test Dice (mean ± std over seeds)", "test IoU", "val Dice", "seeds",
         "train s"], rows, ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]))
    acc = result.get("acceptance", {})
    if acc.get("checks"):
        lines += ["", "## Acceptance (label efficiency: budgets <= 25 %; "
                      "on nuclei, text that only helps: every budget)", ""]
        for c in acc["checks"]:
            lines.append(f"- {100 * c['labeled_fraction']:g} %: {c['claim']}: Dice gap {c['dice_gap']:+.3f} -> "
                         f"{'holds' if c['holds'] else 'does NOT hold'}")
    unet_aug = [r for r in result["runs"] if r["method"] == "unet"]
    if unet_aug:
        chosen = ", ".join(f"{100 * r['labeled_fraction']:g}%/s{r['seed']}: {'on' if r['augment'] else 'off'}"
                           for r in unet_aug)
        lines += ["", f"U-Net augmentation chosen on validation Dice per run: {chosen}."]
    lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "One backbone per dataset, pretrained without labels on the train+val images only; every method "
    "shares it (the U-Net trains from scratch: it has no unlabeled pretraining, which is the point of comparison).",
    "Same labeled subsets for every method (select_labeled, seeded and nested), same optimiser steps "
    "(epochs raised so each run gets at least min_steps steps), checkpoint chosen on the validation split, "
    "test split scored once.",
    "Text methods train without augmentation: flips and 90-degree turns swap left/right and upper/lower "
    "and would contradict reports that name locations. The image-only U-Net never reads the report, so "
    "flips cannot contradict anything it sees; on the text-necessary set which lesions are labeled is "
    "independent of their position, so flipped samples stay valid samples for it. Its augmentation (on/off) "
    "is chosen per run on validation Dice.",
    "fasttextdiff uses the 'tiny' ModernBERT (random weights, real tokenizer): ModernBERT weights cannot "
    "be had offline. bert_text uses the real pretrained all-MiniLM-L6-v2.",
]


def write_outputs(result: dict, out_dir: Path, name: str, plot: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / f"accuracy_{name}.json", result)
    common.write_text(out_dir / f"accuracy_{name}.md", markdown(result))
    if plot and result["results"]:
        common.plot_label_efficiency(result, out_dir / f"accuracy_{name}.png")


# ------------------------------------------------------------------------------------------------


def build_plan(args) -> Plan:
    plan = PAPER if args.paper_scale else QUICK if args.quick else FULL
    changes = {}
    for name in ("size", "pretrain_steps", "epochs", "min_steps", "lr", "fusion_dim", "n_train", "n_val", "n_test"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.widths:
        changes["widths"] = tuple(args.widths)
    if args.budgets:
        changes["budgets"] = tuple(args.budgets)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.methods:
        bad = sorted(set(args.methods) - set(METHODS))
        if bad:
            raise SystemExit(f"unknown methods {bad}; choose from {list(METHODS)}")
        changes["methods"] = tuple(m for m in METHODS if m in args.methods)
    if args.text_residual is not None:
        changes["text_residual"] = args.text_residual
    if args.text_dropout is not None:
        changes["text_dropout"] = args.text_dropout
    if args.text_fallback is not None:
        changes["text_fallback"] = args.text_fallback == "on"
    if args.dataset == "nuclei" and "size" not in changes:
        changes["size"] = 64  # tile size = model size: no resampling of the real pixels
    return replace(plan, **changes)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Label-efficiency benchmark.")
    p.add_argument("--dataset", choices=DATASETS, default="text-necessary")
    p.add_argument("--path", help="LViT-layout folder for --dataset lvit")
    p.add_argument("--quick", action="store_true", help="3 budgets (10/25/50 %%), 1 seed")
    p.add_argument("--paper-scale", action="store_true", help="256 px, the paper's timesteps/epochs/lr (GPU)")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--name", help="results file stem (default: the dataset name, + _quick with --quick)")
    p.add_argument("--work", type=Path, help="keep the work folder here (default: a temporary folder)")
    p.add_argument("--backbone", type=Path, help="use this pretrained backbone (e.g. WORK/backbone of an earlier run "
                   "on the same dataset and plan) instead of pretraining one")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine 2 threads were measured 1-10x slower)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--budgets", type=float, nargs="+")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--methods", nargs="+")
    p.add_argument("--widths", type=int, nargs="+")
    for name, typ in (("size", int), ("pretrain-steps", int), ("epochs", int), ("min-steps", int), ("lr", float),
                      ("fusion-dim", int), ("n-train", int), ("n-val", int), ("n-test", int)):
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--text-residual", choices=("plain", "zero", "gate"), help="text methods: how the text "
                   "residual starts (FusionConfig.text_residual; default: the library's)")
    p.add_argument("--text-dropout", type=float, help="text methods: per-sample text dropout in training "
                   "(default: the library's)")
    p.add_argument("--text-fallback", choices=("on", "off"), help="text methods: image-only phase first, keep "
                   "the better on validation (TrainConfig.text_fallback; default: the library's)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only rewrite the .md and .png next to an existing results JSON (no training)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="combine the runs of several results JSONs of one dataset and plan (e.g. one per seed, "
                        "run side by side) into --out/accuracy_NAME.* (no training); PATH:no_text,unet takes only "
                        "those methods' runs from PATH")
    args = p.parse_args(argv)
    if args.merge:
        return merge_results(args.merge, args.out, args.name or "merged", plot=not args.no_plot)
    if args.render:
        result = json.loads(args.render.read_text())
        stem = args.render.stem.removeprefix("accuracy_")
        write_outputs(result, args.render.parent, stem, plot=not args.no_plot)
        return result
    common.set_threads(args.threads)
    plan = build_plan(args)
    command = "python bench/accuracy.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    name = args.name or (args.dataset + ("_quick" if args.quick else ""))
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        return _run(args, plan, args.work, command, name)
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        return _run(args, plan, Path(tmp), command, name)


def merge_results(paths: list[Path], out_dir: Path, name: str, plot: bool = True) -> dict:
    """One result from several runs of the same dataset (seeds or methods split over processes): the
    runs are concatenated (a (method, budget, seed) seen twice is refused), then aggregated afresh."""
    parts = []
    for spec in map(str, paths):  # PATH or PATH:method,method (only those methods' runs of that file)
        path, _, only = spec.partition(":") if not Path(spec).is_file() else (spec, "", "")
        part = json.loads(Path(path).read_text())
        if only:
            part = {**part, "runs": [r for r in part["runs"] if r["method"] in only.split(",")],
                    "command": f"{part['command']} [{only} runs only]"}
        parts.append(part)
    if len({r["dataset"] for r in parts}) != 1:
        raise SystemExit(f"cannot merge results of different datasets: {sorted({r['dataset'] for r in parts})}")
    result = dict(parts[0])
    runs = common.concat_runs(parts, paths)
    seeds = sorted({r["seed"] for r in runs})
    result.update(name=name, runs=runs, results=aggregate(runs),
                  acceptance=acceptance(result["dataset"], aggregate(runs)),
                  command=" ; ".join(r["command"] for r in parts),
                  complete=all(r.get("complete") for r in parts), seconds=max(r["seconds"] for r in parts),
                  loadavg_end=parts[-1].get("loadavg_end"), merged_from=[str(p) for p in paths],
                  plan={**result["plan"], "seeds": seeds,
                        "methods": [m for m in METHODS if any(r["method"] == m for r in runs)]})
    write_outputs(result, out_dir, name, plot=plot)
    print(markdown(result))
    return result


def _run(args, plan: Plan, work: Path, command: str, name: str) -> dict:
    from fasttextdiff.training.workflows import load_lvit

    started = time.perf_counter()
    machine = common.machine_info()
    root, plan, window, description = prepare_data(args, plan, work)
    splits = load_lvit(root)
    if "val" not in splits or "test" not in splits:
        raise SystemExit(f"{root} needs Train_Folder, Val_Folder and Test_Folder")
    if args.backbone:
        backbone_dir, pretrain_s = args.backbone, 0.0
    else:
        backbone_dir, pretrain_s = pretrain(root, splits, plan, window, work, args.device)
    print(f"[accuracy] {name}: backbone pretrained in {pretrain_s:.0f} s", flush=True)
    result = {"dataset": args.dataset, "name": name, "description": description, "command": command,
              "quick": bool(args.quick),
              "paper_scale": bool(args.paper_scale), "machine": machine,
              "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(plan).items()},
              "split_sizes": [len(splits["train"]), len(splits["val"]), len(splits["test"])],
              "window": list(window) if window else None, "pretrain_seconds": round(pretrain_s, 1),
              "backbone": str(args.backbone) if args.backbone else "pretrained in this run",
              "runs": [], "results": [], "notes": NOTES, "complete": False}
    for seed in plan.seeds:
        for fraction in sorted(plan.budgets):
            for method in plan.methods:
                t0 = time.perf_counter()
                if method == "unet":
                    run = run_unet(splits, plan, fraction, seed, window)
                else:
                    run = run_fasttextdiff(method, splits, backbone_dir, plan, fraction, seed, work, args.device)
                run.update(method=method, labeled_fraction=fraction, seed=seed)
                result["runs"].append(run)
                print(f"[accuracy] seed {seed} {100 * fraction:5.1f}% {method:12s} test Dice {run['dice']:.3f} "
                      f"IoU {run['iou']:.3f} (val {run['val_dice']:.3f}, {run['labeled_images']} images, "
                      f"{run['epochs']} epochs, {time.perf_counter() - t0:.0f} s)", flush=True)
                result["results"] = aggregate(result["runs"])
                result["seconds"] = round(time.perf_counter() - started, 1)
                result["loadavg_end"] = common.loadavg()
                result["acceptance"] = acceptance(args.dataset, result["results"])
                write_outputs(result, args.out, name, plot=False)  # partial results survive an interruption
    result["complete"] = True
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["loadavg_end"] = common.loadavg()
    write_outputs(result, args.out, name, plot=not args.no_plot)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

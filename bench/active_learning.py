"""Active learning, simulated the way the MONAI Label server runs it: does a strategy earn its labels?

For each dataset, seed and strategy, a studies folder is made from the training pool (images and
their reports, `<id>.txt`) and opened with the app's own datastore (`lib.datastore.FastTextDiffDatastore`);
the app's task config (`lib.configs.fasttextdiff.FastTextDiffConfig`) gives the strategies and the
scoring method exactly as the server wires them, on a ModelManager over a temporary state folder.
A small seeded set of images is labeled first (the same seed model for every strategy of a seed);
then each round
  1. the scoring method `fasttextdiff_uncertainty` scores the unlabeled images whose model or report
     changed (only for the strategies that read scores: `uncertainty`, `report_mismatch`), timed;
  2. the strategy is asked k times for the next image, and each offered image is labeled by saving
     its ground-truth mask through the datastore (`save_human_label(..., "final")`), as a client would
     (the server's scoring would run in the background meanwhile; here it ran just before, so the
     scores are those of the current model either way);
  3. fusion + head train on the datastore's labeled images and reports (`lib.training.labeled_samples`),
     continuing from the served model (`train_segmenter(..., init_dir=<served model>)`), and the result
     is published as the new served model;
  4. the test split is scored (per-image Dice, `evaluate_model`, one noise draw).
One backbone per dataset is pretrained without labels on the train+val images (`accuracy.pretrain`) and
kept under --work, so a rerun with the same --work reuses it. Validation images choose each round's
best epoch; the test split is never used for a choice.

Per dataset and strategy the results give the Dice at each label count (mean and per seed),
`labels_to_match_random` (the first label count at which the strategy's mean curve reaches the mean
Dice random reaches with the whole budget, or null) and the scoring seconds per image.

    python bench/active_learning.py --quick           # < 15 min on 2 cores -> results/active_learning_quick.*
    python bench/active_learning.py                   # 3 seeds, both datasets -> results/active_learning.*
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import common
from common import mean_std

APP_DIR = common.ROOT / "monailabel_app"
if str(APP_DIR) not in sys.path:  # the app's modules import as `lib.…`, as under MONAI Label
    sys.path.insert(0, str(APP_DIR))

DATASETS = ("text-necessary", "nuclei")
STRATEGIES = ("random", "first", "uncertainty", "report_mismatch")
SCORED = ("uncertainty", "report_mismatch")  # strategies that read the scoring method's scores


@dataclass(frozen=True)
class Plan:
    size: int = 64
    pool: int = 40  # training images the strategies choose from (text-necessary; nuclei has 32 tiles)
    n_val: int = 8
    n_test: int = 24
    widths: tuple[int, ...] = (16, 32, 64)
    timesteps: tuple[int, ...] = (50, 150, 250)
    pretrain_steps: int = 100
    pretrain_batch: int = 8
    seed_labels: int = 4
    per_round: int = 4
    rounds: int = 3
    initial_steps: int = 120  # optimiser steps of the seed model
    round_steps: int = 40  # optimiser steps of each continued training
    val_checks: int = 2  # validations per training (each is a backbone forward of every validation image)
    # 4, not the library's 8: with a handful of labels every epoch would be one step, and a training's
    # fixed cost per epoch (checkpoint, validation) would dominate the seconds
    batch_size: int = 4
    lr: float = 1e-3
    fusion_dim: int = 32
    n_noise: int = 2  # noise draws of the scoring method (the server's default is max(2, n_noise=4))
    seeds: tuple[int, ...] = (0,)
    datasets: tuple[str, ...] = DATASETS
    strategies: tuple[str, ...] = STRATEGIES


# --quick: sized to finish in < 15 min on 2 shared cores (measured: see bench/README.md)
QUICK = Plan()
# the full run: 3 seeds, 5 rounds, a 32-image test split, the server's 4 noise draws; same pool, validation
# split and backbone settings as --quick, so that a --work folder of a --quick run lends it its backbones
FULL = Plan(n_test=32, rounds=5, n_noise=4, seeds=(0, 1, 2))


# ------------------------------------------------------------------------------------------------
# data, backbone, the seed model
# ------------------------------------------------------------------------------------------------


def prepare_dataset(dataset: str, plan: Plan, work: Path, data_seed: int):
    """-> (splits with the pool as 'train', intensity window, description)."""
    from fasttextdiff.data.synthetic import make_lvit_dataset
    from fasttextdiff.training.workflows import load_lvit

    shutil.rmtree(work / "data", ignore_errors=True)  # a kept --work may hold other split sizes: never mix them
    if dataset == "text-necessary":
        root = make_lvit_dataset(work / "data", variant="text-necessary", n_train=plan.pool, n_val=plan.n_val,
                                 n_test=plan.n_test, size=plan.size, seed=data_seed)
        window, what = None, f"synthetic text-necessary chest X-rays ({plan.size} px, data seed {data_seed})"
    elif dataset == "nuclei":
        import nuclei

        root = nuclei.make_nuclei_dataset(work / "data", tile=plan.size)
        window, what = nuclei.WINDOW, f"real fluorescence nuclei tiles ({plan.size} px, bench/nuclei.py)"
    else:
        raise SystemExit(f"unknown dataset {dataset!r}; choose from {list(DATASETS)}")
    splits = load_lvit(root)
    splits["train"] = splits["train"][: plan.pool]
    return splits, window, what


def backbone_for(dataset: str, splits: dict, plan: Plan, window, work: Path, device) -> tuple[Path, float, bool]:
    """The dataset's pretrained backbone under `work`, reused when it was made with the same settings."""
    import accuracy

    backbone, stamp = work / "backbone", work / "backbone.settings.json"
    settings = {"dataset": dataset, "size": plan.size, "widths": list(plan.widths), "timesteps": list(plan.timesteps),
                "pretrain_steps": plan.pretrain_steps, "pretrain_batch": plan.pretrain_batch,
                "images": sorted(s.name for split in ("train", "val") for s in splits[split])}
    if backbone.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return backbone, 0.0, True
    shutil.rmtree(backbone, ignore_errors=True)
    acc_plan = accuracy.Plan(size=plan.size, widths=plan.widths, timesteps=plan.timesteps,
                             pretrain_steps=plan.pretrain_steps, pretrain_batch=plan.pretrain_batch)
    _, seconds = accuracy.pretrain(None, splits, acc_plan, window, work, device)
    common.write_json(stamp, settings)
    return backbone, seconds, False


def epochs_for(steps: int, n_labeled: int, batch_size: int) -> int:
    return max(1, math.ceil(steps / math.ceil(n_labeled / batch_size)))


def train(samples, out: Path, backbone: Path, plan: Plan, steps: int, seed: int, val, device, text_cache: Path,
          init_dir: Path | None) -> dict:
    """The library's training, as the server's train task calls it (continuing from `init_dir`)."""
    from fasttextdiff.config import FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.training.segmenter import train_segmenter

    epochs = epochs_for(steps, len(samples), plan.batch_size)
    config = TrainConfig(epochs=epochs, batch_size=plan.batch_size, lr=plan.lr, seed=seed,
                         val_every=max(1, epochs // plan.val_checks))
    return train_segmenter(samples, out, backbone_dir=backbone, text_config=TextConfig(encoder="tiny"),
                           segmenter_config=SegmenterConfig(fusion=FusionConfig(dim=plan.fusion_dim, heads=4)),
                           train_config=config, val_samples=val, device=device, progress=False,
                           text_cache_dir=text_cache, init_dir=init_dir)


def test_dice(model_dir: Path, test, device) -> float:
    from fasttextdiff.inference.evaluate import evaluate_model

    return float(evaluate_model(model_dir, test, device=device, n_noise=1, progress=False)["dice_mean"])


def binary_labels(pool, out: Path) -> dict[str, Path]:
    """Each pool image's ground-truth mask as a 0/1 label file (what a client saves as `final`), by image id."""
    import numpy as np

    from fasttextdiff.data.io import read_image, write_image
    from fasttextdiff.data.preprocess import mask_to_labels

    out.mkdir(parents=True, exist_ok=True)
    labels = {}
    for sample in pool:
        image_id = Path(sample.image).name.rsplit(".", 1)[0]
        mask = read_image(sample.mask)
        labels[image_id] = write_image(out / f"{image_id}.png", mask_to_labels(mask.array).astype(np.uint8), like=mask)
    return labels


# ------------------------------------------------------------------------------------------------
# one simulated annotation loop, through the app's datastore, strategies and scoring
# ------------------------------------------------------------------------------------------------


class AppLoop:
    """The app's datastore, model manager, strategies and scoring method on a studies folder of its own."""

    def __init__(self, run_dir: Path, pool, device: str):
        from lib.configs.app_conf import AppConf
        from lib.configs.fasttextdiff import SCORING, FastTextDiffConfig
        from lib.datastore import FastTextDiffDatastore
        from lib.model_manager import ModelManager, ModelPaths

        studies = run_dir / "studies"
        studies.mkdir(parents=True, exist_ok=True)
        for sample in pool:
            shutil.copy2(sample.image, studies / Path(sample.image).name)
            (studies / f"{Path(sample.image).name.rsplit('.', 1)[0]}.txt").write_text(sample.text, encoding="utf-8")
        self.conf = AppConf.from_conf({"state_dir": str(run_dir / "state"), "device": device or "auto",
                                       "prepare_default_model": "false"})
        self.datastore = FastTextDiffDatastore(str(studies), extensions=["*.png"], auto_reload=False)
        self.datastore.read_report_files()  # the reports come in as the server reads them: `<id>.txt`
        self.paths = ModelPaths.from_conf(self.conf, str(studies), str(APP_DIR))
        self.manager = ModelManager(self.conf, self.paths)
        config = FastTextDiffConfig(self.conf, self.paths, self.manager, lambda: self.datastore)
        self.strategies = config.strategies()
        self.scoring = config.scoring_methods()[SCORING]
        self.scoring_name = SCORING

    def submit(self, image_id: str, label: Path) -> None:
        self.datastore.save_human_label(image_id, str(label), "final", {})

    def publish(self, model_dir: Path, copy: bool = False) -> Path:
        from fasttextdiff.utils.atomic import publish

        staging = self.paths.work / f"publish-{time.time_ns()}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copytree(model_dir, staging)
        else:
            model_dir.rename(staging)
        return publish(staging, self.paths.publish_root)

    def score(self, n_noise: int) -> dict:
        return self.scoring({"method": self.scoring_name, "n_noise": n_noise}, self.datastore)

    def pick(self, strategy: str) -> dict | None:
        return self.strategies[strategy]({"strategy": strategy}, self.datastore)

    def labeled_samples(self):
        from lib.training import labeled_samples

        return labeled_samples(self.datastore)


def run_strategy(strategy: str, seed: int, ctx: dict, bar) -> dict:
    plan, work = ctx["plan"], ctx["work"]
    run_dir = work / "runs" / f"{strategy}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    random.seed(seed)  # the `random` strategy draws from Python's random module
    loop = AppLoop(run_dir, ctx["pool"], ctx["device"])
    for image_id in ctx["seed_ids"][seed]:
        loop.submit(image_id, ctx["labels"][image_id])
    loop.publish(ctx["seed_models"][seed], copy=True)
    curve = [{"labels": len(loop.datastore.get_labeled_images()), "dice": ctx["seed_dice"][seed],
              "datastore_labeled": sorted(loop.datastore.get_labeled_images())}]
    for round_index in range(1, plan.rounds + 1):
        step = {"round": round_index}
        if strategy in SCORED:
            scored = loop.score(plan.n_noise)
            step.update(scored=scored["scored"], skipped=scored["skipped"], scoring_seconds=scored["seconds"],
                        scoring_seconds_per_image=scored["seconds"] / scored["scored"] if scored["scored"] else None)
        picks = []
        for _ in range(plan.per_round):
            choice = loop.pick(strategy)
            if not choice:
                break
            loop.submit(choice["id"], ctx["labels"][choice["id"]])
            picks.append({k: v for k, v in choice.items() if k in ("id", "uncertainty", "report_mismatch", "rank_sum",
                                                                    "fallback", "score_current")})
        samples = loop.labeled_samples()
        served = loop.paths.served_model_dir()
        t0 = time.perf_counter()
        out = loop.paths.work / "segmenter-run"
        metrics = train(samples, out, ctx["backbone"], plan, plan.round_steps, seed * 1000 + round_index,
                        ctx["splits"]["val"], ctx["device"], ctx["text_cache"], init_dir=served)
        step["train_seconds"] = round(time.perf_counter() - t0, 2)
        loop.publish(out)
        dice = test_dice(loop.paths.served_model_dir(), ctx["splits"]["test"], ctx["device"])
        labeled = sorted(loop.datastore.get_labeled_images())
        step.update(labels=len(labeled), dice=dice, picked=picks, val_dice=metrics.get("best_val_dice"),
                    trained_on=len(samples), datastore_labeled=labeled)
        curve.append(step)
        bar.set_postfix_str(f"{ctx['dataset']} s{seed} {strategy} r{round_index}: {len(labeled)} labels, Dice "
                            f"{dice:.3f}")
        bar.update(1)
    if not ctx.get("keep"):
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"strategy": strategy, "seed": seed, "curve": curve}


# ------------------------------------------------------------------------------------------------
# aggregation and outputs
# ------------------------------------------------------------------------------------------------


def labels_to_reach(labels: list[int], dice: list[float], target: float) -> int | None:
    """The first label count at which the curve reaches `target` (or None)."""
    return next((n for n, d in zip(labels, dice) if d >= target - 1e-12), None)


def summarize(runs: list[dict], strategies) -> dict:
    """Per strategy: the mean curve over seeds, per-seed curves, final Dice, labels_to_match_random, scoring cost.

    Only seeds that every strategy finished count, so that a stopped run compares like with like."""
    out: dict = {}
    done = set.intersection(*({r["seed"] for r in runs if r["strategy"] == s} for s in strategies)) if runs else set()
    for strategy in strategies:
        group = [r for r in runs if r["strategy"] == strategy and r["seed"] in done]
        if not group:
            continue
        labels = [p["labels"] for p in group[0]["curve"]]
        per_seed = {str(r["seed"]): [round(p["dice"], 5) for p in r["curve"]] for r in group}
        means, stds = zip(*(mean_std([r["curve"][i]["dice"] for r in group]) for i in range(len(labels))))
        costs = [p["scoring_seconds_per_image"] for r in group for p in r["curve"]
                 if p.get("scoring_seconds_per_image")]
        scored = [p for r in group for p in r["curve"] if "scored" in p]
        out[strategy] = {"labels": labels, "dice_mean": [round(m, 5) for m in means],
                         "dice_std": [round(s, 5) for s in stds], "dice_per_seed": per_seed,
                         "final_dice_mean": round(means[-1], 5), "final_dice_std": round(stds[-1], 5),
                         "seeds": [r["seed"] for r in group],
                         "scoring_seconds_per_image": round(mean_std(costs)[0], 4) if costs else None,
                         "images_scored": sum(p["scored"] for p in scored) if scored else None,
                         "images_skipped_as_current": sum(p["skipped"] for p in scored) if scored else None}
    if "random" in out:
        target = out["random"]["final_dice_mean"]
        for s in out.values():
            s["labels_to_match_random"] = labels_to_reach(s["labels"], s["dice_mean"], target)
        random_needs = out["random"]["labels_to_match_random"]  # the budget, or less where random's curve peaked early
        for strategy, s in out.items():
            s["beats_random"] = bool(strategy != "random" and s["labels_to_match_random"] is not None
                                     and s["labels_to_match_random"] < random_needs and s["final_dice_mean"] > target)
    return out


def _ordered(result: dict) -> list[str]:
    """The datasets in the plan's order (the JSON is written with sorted keys)."""
    return [d for d in result["plan"]["datasets"] if d in result["datasets"]]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Active learning: Dice versus labels, per strategy", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {m['cpu']}, {m['torch_threads']} torch thread(s), load average at start {m['loadavg_start']}, "
             f"at end {result.get('loadavg_end')}; wall time {result['seconds'] / 60:.1f} min"
             + (" (`--quick`)." if result["quick"] else ".")
             + ("" if result.get("complete") else " **Stopped before the end: the tables use the seeds every strategy "
                "finished.**"), "",
             f"Seeds {result['plan']['seeds']}; {result['plan']['seed_labels']} seed labels, then "
             f"{result['plan']['rounds']} rounds of {result['plan']['per_round']} labels; continued training "
             f"{result['plan']['round_steps']} steps per round; scoring with {result['plan']['n_noise']} noise draws.",
             ""]
    for dataset in _ordered(result):
        d = result["datasets"][dataset]
        summary = d["summary"]
        strategies = list(summary)
        seeds_used = summary[strategies[0]]["seeds"] if strategies else []
        lines += [f"## {dataset}", "",
                  f"{d['description']}; pool/val/test = {d['split_sizes']}; seeds {seeds_used}; backbone "
                  + ("reused from --work" if d["backbone_reused"] else f"pretrained in {d['pretrain_seconds']:.0f} s")
                  + ".", "", "Test Dice, mean ± std over seeds:", ""]
        labels = summary[strategies[0]]["labels"]
        rows = [[n] + [f"{summary[s]['dice_mean'][i]:.3f} ± {summary[s]['dice_std'][i]:.3f}" for s in strategies]
                for i, n in enumerate(labels)]
        lines += [common.markdown_table(["labels"] + strategies, rows, ["---:"] + ["---:"] * len(strategies)), ""]
        rows = [[s, f"{summary[s]['final_dice_mean']:.3f} ± {summary[s]['final_dice_std']:.3f}",
                 summary[s].get("labels_to_match_random"), "yes" if summary[s].get("beats_random") else "no",
                 f"{summary[s]['scoring_seconds_per_image']:.3f}" if summary[s]["scoring_seconds_per_image"] else "-"]
                for s in strategies]
        lines += [common.markdown_table(["strategy", "final Dice", "labels_to_match_random", "beats random",
                                         "scoring s/image"], rows, ["---", "---:", "---:", "---", "---:"]), ""]
    lines += ["`labels_to_match_random`: the first label count at which the strategy's mean curve reaches the mean "
              "Dice `random` has with the whole budget (empty: never). `beats random`: it gets there with fewer "
              "labels than random itself first does, and ends above random.", "",
              f"Default next_sample strategy these numbers support: **{result['recommended_default']}** "
              f"({result['recommendation_reason']})"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = _ordered(result)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for strategy, s in result["datasets"][dataset]["summary"].items():
            cost = f", {s['scoring_seconds_per_image']:.2f} s/img scoring" if s["scoring_seconds_per_image"] else ""
            lo = [m - e for m, e in zip(s["dice_mean"], s["dice_std"])]
            hi = [m + e for m, e in zip(s["dice_mean"], s["dice_std"])]
            line, = ax.plot(s["labels"], s["dice_mean"], marker="o", label=f"{strategy}{cost}")
            if len(s["seeds"]) > 1:
                ax.fill_between(s["labels"], lo, hi, color=line.get_color(), alpha=0.12)
        ax.set_xlabel("labeled images")
        seeds = next(iter(result["datasets"][dataset]["summary"].values()), {}).get("seeds", [])
        ax.set_ylabel(f"test Dice (mean over {len(seeds)} seed(s))")
        ax.set_title(dataset)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Active learning: Dice versus labels" + (" (--quick)" if result["quick"] else ""))
    out = common.savefig(fig, path)
    plt.close(fig)
    return out


def recommend(datasets: dict) -> tuple[str, str]:
    """A strategy other than random only if it beats random on every dataset measured."""
    names = [set(s for s, v in d["summary"].items() if v.get("beats_random")) for d in datasets.values()]
    winners = sorted(set.intersection(*names)) if names else []
    if len(datasets) < 2:
        return "random", "only one dataset measured: keep random"
    if winners:
        return winners[0], f"beats random on {', '.join(datasets)}"
    return "random", "no strategy beats random on every dataset"


def write_outputs(result: dict, out_dir: Path, name: str, with_plot: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / f"{name}.json", result)
    if result["datasets"] and all(d.get("summary") for d in result["datasets"].values()):
        common.write_text(out_dir / f"{name}.md", markdown(result))
        if with_plot:
            plot(result, out_dir / f"{name}.png")


# ------------------------------------------------------------------------------------------------


def build_plan(args) -> Plan:
    plan = QUICK if args.quick else FULL
    changes = {}
    for name in ("size", "pool", "n_val", "n_test", "pretrain_steps", "seed_labels", "per_round", "rounds",
                 "initial_steps", "round_steps", "n_noise"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.widths:
        changes["widths"] = tuple(args.widths)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    for name, known in (("datasets", DATASETS), ("strategies", STRATEGIES)):
        chosen = getattr(args, name)
        if chosen:
            bad = sorted(set(chosen) - set(known))
            if bad:
                raise SystemExit(f"error: unknown {name} {bad}; choose from {list(known)}")
            changes[name] = tuple(k for k in known if k in chosen)
    return replace(plan, **changes)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Simulated active learning through the MONAI Label app's datastore, strategies and "
                    "scoring: Dice versus labels per strategy.",
        epilog="example: python bench/active_learning.py --quick   |   "
               "python bench/active_learning.py --datasets nuclei --strategies random uncertainty --seeds 0 1 2")
    p.add_argument("--quick", action="store_true",
                   help="tiny run (< 15 min on 2 cores): 40-image pool, 3 rounds of 4 labels, 1 seed")
    p.add_argument("--datasets", nargs="+", metavar="NAME",
                   help=f"datasets to run (default all: {' '.join(DATASETS)})")
    p.add_argument("--strategies", nargs="+", metavar="NAME",
                   help=f"strategies to compare (default all: {' '.join(STRATEGIES)}); labels_to_match_random needs "
                        "random")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="seeds (seed labels, training, random picks); default 0 (quick) or 0 1 2")
    p.add_argument("--rounds", type=int, help="annotation rounds after the seed labels (default 3 quick, 5 full)")
    p.add_argument("--per-round", type=int, help="images labeled per round, k strategy calls (default 4)")
    p.add_argument("--seed-labels", type=int, help="images labeled before the first round (default 4)")
    p.add_argument("--pool", type=int, help="text-necessary training pool size (default 40; nuclei has 32 tiles)")
    p.add_argument("--n-val", type=int,
                   help="text-necessary validation images (choose each round's best epoch; default 8)")
    p.add_argument("--n-test", type=int,
                   help="text-necessary test images (scored after every round; default 24 quick, 32 full)")
    p.add_argument("--size", type=int, help="image size in px (default 64; nuclei tiles must divide 512)")
    p.add_argument("--widths", type=int, nargs="+", help="backbone U-Net widths (default 16 32 64)")
    p.add_argument("--pretrain-steps", type=int, help="backbone pretraining steps per dataset (default 100)")
    p.add_argument("--initial-steps", type=int, help="optimiser steps of the seed model (default 120)")
    p.add_argument("--round-steps", type=int, help="optimiser steps of each round's continued training (default 40)")
    p.add_argument("--n-noise", type=int, help="noise draws of the uncertainty scoring (default 2 quick, 4 full)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data set (default 0)")
    p.add_argument("--work", type=Path,
                   help="work folder, kept (backbones are reused from it); default a temporary one")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's studies folder and state under --work")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default bench/results)")
    p.add_argument("--name", help="results file stem (default active_learning, active_learning_quick with --quick)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--no-plot", action="store_true", help="write JSON and markdown only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only rewrite the .md and .png of an existing results JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render:  # summaries are recomputed from the runs: a stopped run's JSON is rendered on complete seeds
        result = json.loads(args.render.read_text())
        strategies = result["plan"]["strategies"]
        for d in result["datasets"].values():
            d["summary"] = summarize(d["runs"], strategies)
        result["recommended_default"], result["recommendation_reason"] = recommend(result["datasets"])
        write_outputs(result, args.render.parent, args.render.stem, with_plot=not args.no_plot)
        return result
    common.set_threads(args.threads)
    from fasttextdiff.commands.main import _quiet_third_party

    _quiet_third_party()  # transformers' per-load bars would drown the round bar
    plan = build_plan(args)
    if min(plan.seed_labels, plan.per_round, plan.rounds) < 1:
        raise SystemExit("error: --seed-labels, --per-round and --rounds must be at least 1")
    command = "python bench/active_learning.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    name = args.name or ("active_learning_quick" if args.quick else "active_learning")
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        return _run(args, plan, args.work, command, name)
    with tempfile.TemporaryDirectory(prefix="bench-active-learning-") as tmp:
        return _run(args, plan, Path(tmp), command, name)


def prepare_context(dataset: str, plan: Plan, work: Path, args, result: dict) -> dict:
    """One dataset's splits, pretrained backbone and 0/1 label files; its entry in `result`."""
    dwork = work / dataset
    dwork.mkdir(parents=True, exist_ok=True)
    splits, window, description = prepare_dataset(dataset, plan, dwork, args.data_seed)
    pool = splits["train"]
    if plan.seed_labels + plan.rounds * plan.per_round > len(pool):
        raise SystemExit(f"error: {dataset}: {plan.seed_labels} seed labels + {plan.rounds} x {plan.per_round} "
                         f"exceed the pool of {len(pool)} images")
    backbone, pretrain_s, reused = backbone_for(dataset, splits, plan, window, dwork, args.device)
    result["datasets"][dataset] = {
        "description": description, "split_sizes": [len(pool), len(splits["val"]), len(splits["test"])],
        "pretrain_seconds": round(pretrain_s, 1), "backbone_reused": reused, "seed_models": {}, "runs": [],
        "summary": {}}
    return {"plan": plan, "work": dwork, "pool": pool, "splits": splits,
            "labels": binary_labels(pool, dwork / "labels01"),
            "dataset": dataset, "backbone": backbone, "device": args.device, "text_cache": dwork / "text_cache",
            "keep": args.keep_runs, "seed_ids": {}, "seed_models": {}, "seed_dice": {}}


def seed_model(ctx: dict, d: dict, seed: int, device) -> None:
    """The model every strategy of this seed starts from: trained from scratch on the seed labels."""
    import numpy as np

    plan, pool = ctx["plan"], ctx["pool"]
    seed_ids = sorted(np.random.default_rng(seed).choice(sorted(ctx["labels"]), plan.seed_labels,
                                                         replace=False).tolist())
    by_id = {Path(s.image).name.rsplit(".", 1)[0]: s for s in pool}
    out = ctx["work"] / "seed-models" / f"s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    metrics = train([by_id[i] for i in seed_ids], out, ctx["backbone"], plan, plan.initial_steps, seed,
                    ctx["splits"]["val"], device, ctx["text_cache"], init_dir=None)
    ctx["seed_ids"][seed], ctx["seed_models"][seed] = seed_ids, out
    ctx["seed_dice"][seed] = test_dice(out, ctx["splits"]["test"], device)
    d["seed_models"][str(seed)] = {"images": seed_ids, "dice": ctx["seed_dice"][seed],
                                   "val_dice": metrics.get("best_val_dice"),
                                   "train_seconds": round(time.perf_counter() - t0, 1)}


def _run(args, plan: Plan, work: Path, command: str, name: str) -> dict:
    from tqdm import tqdm

    started = time.perf_counter()
    result = {"command": command, "quick": bool(args.quick), "machine": common.machine_info(),
              "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(plan).items()},
              "datasets": {}, "complete": False}
    total = len(plan.datasets) * len(plan.seeds) * len(plan.strategies) * plan.rounds
    contexts = {}
    with tqdm(total=total, desc="active learning rounds", disable=args.no_progress, file=sys.stdout) as bar:
        for dataset in plan.datasets:  # data and backbones first: a run stopped early still has every dataset
            bar.set_postfix_str(f"{dataset}: data and backbone")
            contexts[dataset] = prepare_context(dataset, plan, work, args, result)
        for seed in plan.seeds:  # seeds outermost: partial results cover every dataset and strategy
            for dataset in plan.datasets:
                ctx, d = contexts[dataset], result["datasets"][dataset]
                bar.set_postfix_str(f"{dataset} s{seed}: seed model")
                seed_model(ctx, d, seed, args.device)
                for strategy in plan.strategies:
                    d["runs"].append(run_strategy(strategy, seed, ctx, bar))
                    d["summary"] = summarize(d["runs"], plan.strategies)
                    result["seconds"] = round(time.perf_counter() - started, 1)
                    result["loadavg_end"] = common.loadavg()
                    result["recommended_default"], result["recommendation_reason"] = recommend(result["datasets"])
                    write_outputs(result, args.out, name, with_plot=False)  # partial results survive a stop
    result["complete"] = True
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["loadavg_end"] = common.loadavg()
    result["recommended_default"], result["recommendation_reason"] = recommend(result["datasets"])
    write_outputs(result, args.out, name, with_plot=not args.no_plot)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

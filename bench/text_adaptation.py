"""Does clinical adaptation of the text encoder help the segmenter?

One run, side by side on the synthetic text-necessary set (same data, backbone, seed, labels and
schedule): the segmenter trained with a ModernBERT adapted by masked-language modelling on the
IU X-ray reports (`fasttextdiff pretrain-text`), and with the same encoder before adaptation
(same architecture, tokenizer and initialisation recipe, no MLM steps). Writes
bench/results/text_adaptation.json and .md.

    python bench/text_adaptation.py --quick            # CPU-sized (~10 min on 2 cores)
    python bench/text_adaptation.py --encoder DIR      # reuse an adapted encoder you already have
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fasttextdiff.utils.environment import apply_process_defaults

apply_process_defaults()  # offline, passive OpenMP: before torch loads
import torch

from fasttextdiff.experiments.ablation import QUICK
from fasttextdiff.utils.atomic import atomic_write_bytes, atomic_write_json
from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig, TextConfig, TrainConfig
from fasttextdiff.data.synthetic import make_lvit_dataset
from fasttextdiff.inference.evaluate import evaluate_model
from fasttextdiff.training.workflows import load_lvit, lvit_image_paths, pretrain_backbone_on_files
from fasttextdiff.training.text_mlm import pretrain_text
from fasttextdiff.training.segmenter import train_segmenter

RESULTS = Path(__file__).resolve().parent / "results"


def unadapted_copy(adapted: Path, out: Path, seed: int = 0) -> Path:
    """The adapted encoder's architecture and tokenizer with fresh initial weights."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(adapted, local_files_only=True))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapted, local_files_only=True).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--encoder", type=Path, help="an adapted encoder (pretrain-text output); default: make one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--json", type=Path, default=RESULTS / "text_adaptation.json")
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fasttextdiff-textadapt-"))
    plan = QUICK
    started = time.time()

    adapted = args.encoder
    pretrain_metrics = None
    if adapted is None:
        adapted = work / "adapted"
        pretrain_metrics = pretrain_text("iu-xray", None, "tiny", adapted, quick=args.quick, resume=False)
    before = unadapted_copy(adapted, work / "before", seed=args.seed)

    data = make_lvit_dataset(work / "data", variant="text-necessary", n_train=plan.n_train, n_val=plan.n_val,
                             n_test=plan.n_test, size=plan.size, seed=args.seed)
    splits = load_lvit(data)
    pretrain_backbone_on_files(lvit_image_paths(data),
                               BackboneConfig(image_size=plan.size, block_out_channels=plan.widths),
                               work / "backbone", epochs=10_000, max_steps=plan.pretrain_steps,
                               batch_size=plan.pretrain_batch, seed=args.seed, resume=False)
    rows = []
    for name, encoder in (("before_adaptation", before), ("adapted", adapted)):
        t = time.time()
        metrics = train_segmenter(
            splits["train"], work / f"model_{name}", backbone_dir=work / "backbone",
            text_config=TextConfig(encoder=str(encoder)),
            segmenter_config=SegmenterConfig(fusion=FusionConfig(dim=plan.fusion_dim, heads=4)),
            train_config=TrainConfig(epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr, seed=args.seed),
            val_samples=splits["val"])
        train_seconds = time.time() - t
        scores = evaluate_model(work / f"model_{name}", splits["test"])
        rows.append({"encoder": name, "dice_mean": scores["dice_mean"], "dice_std": scores["dice_std"],
                     "iou_mean": scores["iou_mean"], "best_val_dice": metrics.get("best_val_dice"),
                     "seconds_per_epoch": train_seconds / metrics["epochs"], "train_seconds": train_seconds})
    result = {"dataset": "synthetic text-necessary", "plan": "ablation QUICK", "seed": args.seed,
              "pretrain_text": pretrain_metrics and {k: pretrain_metrics.get(k) for k in
                                                     ("perplexity_before", "perplexity_after", "steps", "seconds")},
              "results": rows, "dice_gain_from_adaptation": rows[1]["dice_mean"] - rows[0]["dice_mean"],
              "seconds": round(time.time() - started, 1), "torch_threads": torch.get_num_threads(),
              "command": "python bench/text_adaptation.py" + (" --quick" if args.quick else "")}
    atomic_write_json(args.json, result)
    table = ["| encoder | test Dice | test IoU | best val Dice | s/epoch |", "|---|---|---|---|---|"]
    table += [f"| {r['encoder']} | {r['dice_mean']:.3f} ± {r['dice_std']:.3f} | {r['iou_mean']:.3f} | "
              f"{r['best_val_dice']:.3f} | {r['seconds_per_epoch']:.2f} |" for r in rows]
    atomic_write_bytes(args.json.with_suffix(".md"), ("\n".join(table) + "\n").encode())
    print(json.dumps(result, indent=2))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

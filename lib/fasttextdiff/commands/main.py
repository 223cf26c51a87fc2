"""The `fasttextdiff` command line. Each subcommand is a thin shell over a library function.

User errors (bad files, missing models, unusable reports) print one line `error: ...` and exit 2;
only real bugs print a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from fasttextdiff.utils.environment import apply_process_defaults
from fasttextdiff.config import (TEXT_RESIDUALS, BackboneConfig, FusionConfig, PretrainConfig, SegmenterConfig,
                     TextConfig, TrainConfig)
from fasttextdiff.utils.errors import FastTextDiffError

# MONAI's import emits FutureWarnings about torch.jit that users can do nothing about.
warnings.filterwarnings("ignore", category=FutureWarning)

DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)"

EXAMPLES = """examples:
  fasttextdiff demo-data --out data/synth --variant text-necessary
  fasttextdiff pretrain-backbone --data data/synth --out runs/backbone --epochs 20
  fasttextdiff train --data data/synth --backbone runs/backbone --out runs/model --labeled 0.25
  fasttextdiff evaluate --model runs/model --data data/synth --split test --json runs/eval.json
  fasttextdiff segment image.png --report "Unilateral pulmonary infection, one infected area, upper left lung." \\
      --model runs/model --out mask.png --uncertainty unc.png
  fasttextdiff bench ablation --quick --json bench/results/ablation.json
  accelerate launch --multi_gpu --num_processes 2 -m fasttextdiff.commands.main train --data data/synth \\
      --backbone runs/backbone --out runs/model   # any command that trains, on 2 GPUs (or CPU processes)
"""


def _widths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("widths must be positive integers")
    return values


def _indices(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("expected integers >= 0")
    return values


def _labeled(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("--labeled takes a count (e.g. 10) or a fraction (e.g. 0.25), got "
                                         f"{text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("--labeled must be positive")
    return value


def add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone architecture")
    d = BackboneConfig()
    g.add_argument("--image-size", type=int, default=d.image_size,
                   help=f"model input size in pixels (default {d.image_size}; the paper uses 256)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=d.in_channels,
                   help="1 = grayscale (CT/X-ray), 3 = RGB (histology)")
    g.add_argument("--widths", type=_widths, default=d.block_out_channels,
                   help=f"U-Net level widths (default {','.join(map(str, d.block_out_channels))})")
    g.add_argument("--timesteps", type=_widths, default=d.timesteps,
                   help=f"feature timesteps of 1000 (default {','.join(map(str, d.timesteps))})")
    g.add_argument("--window", type=float, nargs=2, metavar=("CENTER", "WIDTH"),
                   help="CT window in HU (default: percentiles)")


def add_text_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-encoder", default=TextConfig.encoder,
                   help="'tiny' (small ModernBERT, offline), a local model directory (e.g. a clinical ModernBERT), "
                        "or a hub id (downloads; offline, download it elsewhere and pass its folder)")
    p.add_argument("--text-max-tokens", "--max-text-tokens", dest="max_text_tokens", type=int,
                   help="truncate reports to this many tokens, special tokens included (default: the encoder's "
                        "whole context; 10 reproduces the reference's truncation)")
    p.add_argument("--text-focus", metavar="DESCRIPTION",
                   help="long reports: keep only the sentences nearest this description of the finding "
                        "(e.g. 'Airspace opacity or consolidation in the right or left lung.')")
    p.add_argument("--text-focus-sentences", type=int,
                   help=f"sentences --text-focus keeps (default {TextConfig.focus_sentences}; only with --text-focus)")


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The paper preset and the flags that override it (unset flags fall back to the preset, then defaults)."""
    from fasttextdiff.experiments.paper import PRESETS

    g = p.add_argument_group("recipe (a --preset sets these; a flag given explicitly wins)")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="the paper's recipe for a dataset on a converted ADM backbone: taps, timesteps 50,150,250 "
                        "(one shared noise draw), 256 px, epochs 50/100/50, Adam lr 1e-4")
    g.add_argument("--epochs", type=int, help=f"training epochs (default {TrainConfig.epochs})")
    g.add_argument("--lr", type=float, help=f"Adam learning rate (default {TrainConfig.lr:g})")
    g.add_argument("--taps", type=_indices, metavar="N,N,...",
                   help="tap these ADM output_blocks of the backbone instead of its configured ones (e.g. 4,6,8,12)")
    g.add_argument("--timesteps", type=_indices, help="feature timesteps of 1000 (default: the backbone's)")
    g.add_argument("--image-size", type=int, help="model input size in pixels (default: the backbone's)")


def cmd_demo_data(args) -> int:
    from fasttextdiff.data.synthetic import make_lvit_dataset

    root = make_lvit_dataset(args.out, variant=args.variant, n_train=args.n_train, n_val=args.n_val,
                             n_test=args.n_test, size=args.size, seed=args.seed)
    print(f"wrote {args.variant} LViT-layout dataset to {root}")
    return 0


def cmd_pretrain_backbone(args) -> int:
    from fasttextdiff.training.workflows import find_image_files, lvit_image_paths, pretrain_backbone_on_files

    config = BackboneConfig(image_size=args.image_size, in_channels=args.channels, block_out_channels=args.widths,
                            timesteps=args.timesteps, window=tuple(args.window) if args.window else None)
    paths = lvit_image_paths(args.data) if args.data else find_image_files(args.images)
    stats = pretrain_backbone_on_files(paths, config, args.out, epochs=args.epochs, batch_size=args.batch_size,
                                       lr=args.lr, seed=args.seed, max_steps=args.max_steps, device=args.device,
                                       resume=not args.no_resume)
    print(json.dumps(stats, indent=2))
    return 0


def text_config_from_args(args) -> TextConfig:
    if args.text_focus_sentences is not None and args.text_focus is None:
        raise FastTextDiffError("--text-focus-sentences sets how many sentences --text-focus keeps; "
                                "pass --text-focus DESCRIPTION too (or drop --text-focus-sentences)")
    sentences = TextConfig.focus_sentences if args.text_focus_sentences is None else args.text_focus_sentences
    return TextConfig(encoder=args.text_encoder, max_length=args.max_text_tokens,
                      focus=args.text_focus, focus_sentences=sentences)


def train_settings(args) -> tuple[TrainConfig, dict]:
    """TrainConfig and backbone overrides from the flags: an explicit flag beats the preset, which beats
    the library's defaults. Shared by `train` and `reproduce`."""
    from fasttextdiff.experiments.paper import PRESETS

    preset = PRESETS[args.preset] if getattr(args, "preset", None) else None

    def pick(flag, from_preset, default):
        if flag is not None:
            return flag
        return from_preset if preset is not None else default

    overrides = preset.backbone_overrides() if preset else {}
    for name, value in (("feature_taps", getattr(args, "taps", None)), ("timesteps", getattr(args, "timesteps", None)),
                        ("image_size", getattr(args, "image_size", None))):
        if value is not None:
            overrides[name] = value
    train_cfg = TrainConfig(epochs=pick(args.epochs, preset and preset.epochs, TrainConfig.epochs),
                            batch_size=args.batch_size, lr=pick(args.lr, preset and preset.lr, TrainConfig.lr),
                            weight_decay=pick(None, preset and preset.weight_decay, TrainConfig.weight_decay),
                            labeled=args.labeled, seed=args.seed, augment=args.augment,
                            text_fallback=not getattr(args, "no_text_fallback", False))
    return train_cfg, overrides


def cmd_train(args) -> int:
    from fasttextdiff.training.segmenter import train_segmenter
    from fasttextdiff.training.workflows import load_lvit

    text_config = text_config_from_args(args)  # flag combinations refused before the data is read
    splits = load_lvit(args.data)
    seg = SegmenterConfig(use_text=not args.no_text, head_channels=args.head_channels,
                          fusion=FusionConfig(dim=args.fusion_dim, heads=args.heads, shared=not args.per_scale,
                                              text_residual=args.text_residual))
    train_cfg, overrides = train_settings(args)
    metrics = train_segmenter(splits["train"], args.out, backbone_dir=args.backbone, text_config=text_config,
                              segmenter_config=seg, train_config=train_cfg, val_samples=splits.get("val"),
                              test_samples=splits.get("test"), device=args.device, backbone_overrides=overrides)
    metrics.pop("history", None)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from fasttextdiff.utils.atomic import atomic_write_json
    from fasttextdiff.data.lvit import load_split
    from fasttextdiff.inference.evaluate import evaluate_model
    from fasttextdiff.inference.batched import InferenceOptions
    from fasttextdiff.inference.pipeline import Segmenter

    segmenter = Segmenter.load(args.model, device=args.device, n_noise=args.n_noise,
                               options=InferenceOptions(**_precision_option(args)))
    result = evaluate_model(segmenter, load_split(args.data, args.split), n_noise=args.n_noise)
    result["inference"] = segmenter.inference_settings
    if args.json:
        atomic_write_json(args.json, result)
    summary = {k: v for k, v in result.items() if k != "per_image"}
    print(json.dumps(summary, indent=2))
    return 0


def _precision_option(args) -> dict:
    """--precision when given (it wins over FASTTEXTDIFF_PRECISION); else nothing, so the variable decides."""
    return {"precision": args.precision} if getattr(args, "precision", None) else {}


def add_precision_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="inference precision (default: $FASTTEXTDIFF_PRECISION, else auto = bf16/fp16 only where the "
                        "hardware has it natively); bf16 runs on any CPU (emulated, slower) to reproduce a bf16 host")


def read_report_arg(report: str | None, report_file: str | None) -> str:
    from fasttextdiff.utils.errors import ReportError

    if report_file:
        raw = Path(report_file).read_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ReportError(f"{report_file} is not UTF-8 text") from None
    return report or ""


def cmd_segment(args) -> int:
    from fasttextdiff.inference.pipeline import Segmenter

    text = read_report_arg(args.report, args.report_file)
    from fasttextdiff.inference.batched import InferenceOptions

    segmenter = Segmenter.load(args.model, device=args.device, n_noise=args.n_noise,
                               options=InferenceOptions(uncertainty=args.uncertainty_estimate,
                                                        **_precision_option(args)))
    if not text.strip():
        print("warning: empty report: segmenting with the encoder's empty-text embedding", file=sys.stderr)
    # the user's own file on their own machine: a detached header (.nhdr, .mhd + .raw) may name its data file
    result = segmenter.segment_file(args.image, text, args.out, args.uncertainty, allow_external_data=True)
    shown = {}
    if args.overlay:
        from fasttextdiff.inference.overlay import write_overlay

        index = write_overlay(result.image, result.mask, args.overlay)
        shown = {"overlay": str(args.overlay), **({"overlay_slice": index} if index is not None else {})}
    print(json.dumps({"mask": str(args.out), "uncertainty": str(args.uncertainty) if args.uncertainty else None,
                      **shown, **result.summary, "inference": segmenter.inference_settings}, indent=2))
    return 0


def cmd_run_job(args) -> int:
    """One process of a JSON job (what `workflows.launch_job` starts on every GPU)."""
    from fasttextdiff.utils.atomic import atomic_write_json
    from fasttextdiff.training.workflows import run_job

    spec = json.loads(Path(args.job).read_text(encoding="utf-8"))

    def log(record: dict) -> None:  # the loops log on the main process only
        if spec.get("log_file"):
            with open(spec["log_file"], "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    metrics = run_job(spec, log_fn=log)
    if spec.get("result_file") and int(os.environ.get("RANK", "0")) == 0:
        atomic_write_json(spec["result_file"], metrics)
    return 0


def cmd_bench(args) -> int:
    from fasttextdiff.experiments.ablation import run_ablation

    result = run_ablation(quick=args.quick, work_dir=args.work_dir, seed=args.seed, json_path=args.json,
                          device=args.device)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    return 0


def cmd_demo(args) -> int:
    from fasttextdiff.experiments.ablation import run_demo

    run_demo(Path(args.out), device=args.device)
    return 0


LAZY_COMMANDS = {  # name: (module, add-arguments function, run function, help, example)
    "pretrain-text": ("fasttextdiff.training.text_mlm", "add_pretrain_text_arguments", "run_pretrain_text",
                      "adapt a ModernBERT to clinical text by masked-language modelling",
                      "fasttextdiff pretrain-text --corpus iu-xray --init tiny --out runs/clinical-mbert --quick"),
    "demo-studies": ("fasttextdiff.data.demo_studies", "add_demo_studies_arguments", "run_demo_studies",
                     "write a MONAI Label studies folder of synthetic images with reports",
                     "fasttextdiff demo-studies --out studies/demo"),
    "import-studies": ("fasttextdiff.data.import_studies", "add_import_studies_arguments", "run_import_studies",
                       "import images with their reports (and masks) into a MONAI Label studies folder",
                       "fasttextdiff import-studies /data/my-cts --out studies/my-cts   # <name>.txt beside each "
                       "image"),
    "convert-backbone": ("fasttextdiff.conversion.adm", "add_convert_backbone_arguments", "run_convert_backbone",
                         "convert an OpenAI guided-diffusion (ADM) checkpoint into a backbone directory",
                         "fasttextdiff convert-backbone 256x256_diffusion_uncond.pt --arch adm-256-uncond --out "
                         "runs/adm256"),
    "reproduce": ("fasttextdiff.commands.reproduce", "add_reproduce_arguments", "run_reproduce",
                  "train and evaluate the paper's settings for a dataset and table them beside the published results",
                  "fasttextdiff reproduce --dataset qata --data /data/QaTa-COV19 --backbone runs/adm256 "
                  "--text-encoder /models/clinical-modernbert --out runs/reproduce-qata --device cuda"),
    "label-history": ("fasttextdiff.commands.label_history", "add_label_history_arguments", "run_label_history",
                      "list and restore the kept versions of a person's labels on a server",
                      "fasttextdiff label-history --server http://127.0.0.1:8000 --image ct_000 --tag final"),
    "viewer": ("fasttextdiff.viewer.cli", "add_viewer_arguments", "run_viewer",
               "the web annotation viewer (trame-slicer) for a server, on 127.0.0.1",
               "fasttextdiff viewer --server http://127.0.0.1:8000 --port 8080"),
}


def _lazy(module: str, runner: str):
    def run(args):
        return getattr(importlib.import_module(module), runner)(args)

    return run


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is one), else None."""
    return next((a for a in argv if a in LAZY_COMMANDS or a in _EAGER_COMMANDS), None)


_EAGER_COMMANDS = ("demo-data", "pretrain-backbone", "train", "evaluate", "segment", "bench", "run-job", "demo")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `only`, the lazily imported commands other than `only` get no arguments
    (their modules are not imported)."""
    parser = argparse.ArgumentParser(
        prog="fasttextdiff", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Report-conditioned, label-efficient diffusion segmentation (FastTextDiff).", epilog=EXAMPLES)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("demo-data", cmd_demo_data, "write a synthetic chest-X-ray-like dataset in the LViT layout",
            "fasttextdiff demo-data --out data/synth --variant text-necessary")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (LViT layout)")
    p.add_argument("--variant", choices=("standard", "text-necessary", "clinical-reports"), default="standard",
                   help="text-necessary: only the lesions the report names are labeled; clinical-reports: the same "
                        "cases with radiology-style reports (held-out phrasings in Test)")
    p.add_argument("--n-train", type=int, default=80, help="training images (default 80)")
    p.add_argument("--n-val", type=int, default=16, help="validation images (default 16)")
    p.add_argument("--n-test", type=int, default=40, help="test images (default 40)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")

    p = add("pretrain-backbone", cmd_pretrain_backbone, "train the diffusion U-Net as a denoiser on unlabeled images",
            "fasttextdiff pretrain-backbone --data data/synth --out runs/backbone --epochs 20")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="an LViT-layout root (images of all splits, labels unused)")
    src.add_argument("--images", type=Path, nargs="+", help="image files or folders (2D images, volumes' slices)")
    p.add_argument("--out", required=True, type=Path,
                   help="backbone directory to write (an interrupted run resumes from OUT.resume/ beside it)")
    add_backbone_arguments(p)
    p.add_argument("--epochs", type=int, default=PretrainConfig.epochs,
                   help=f"passes over the images (default {PretrainConfig.epochs})")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size,
                   help=f"images per step and process (default {PretrainConfig.batch_size})")
    p.add_argument("--lr", type=float, default=PretrainConfig.lr, help=f"learning rate (default {PretrainConfig.lr})")
    p.add_argument("--seed", type=int, default=PretrainConfig.seed, help="random seed")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint left by an interrupted run")
    p.add_argument("--device", help=DEVICE_HELP)

    p = add("train", cmd_train, "train fusion + head (report-conditioned segmenter) on labeled images",
            "fasttextdiff train --data data/synth --backbone runs/backbone --out runs/model --labeled 10")
    p.add_argument("--data", required=True, type=Path, help="LViT-layout root (Train_Folder, Val_Folder, Test_Folder)")
    p.add_argument("--backbone", required=True, type=Path, help="a pretrain-backbone output directory")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    add_text_arguments(p)
    p.add_argument("--no-text", action="store_true", help="ablation: the same network without the text branch")
    p.add_argument("--labeled", type=_labeled, help="use only N labeled training images, or a fraction (0.25)")
    add_recipe_arguments(p)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help=f"images per step and process (default {TrainConfig.batch_size})")
    p.add_argument("--fusion-dim", type=int, default=FusionConfig.dim,
                   help=f"width of the cross-modal attention (default {FusionConfig.dim}; the paper 768)")
    p.add_argument("--heads", type=int, default=FusionConfig.heads,
                   help=f"attention heads (default {FusionConfig.heads})")
    p.add_argument("--head-channels", type=int, default=SegmenterConfig.head_channels,
                   help=f"channels of the conv head (default {SegmenterConfig.head_channels})")
    p.add_argument("--per-scale", action="store_true", help="one attention block per scale instead of a shared one")
    p.add_argument("--text-residual", choices=TEXT_RESIDUALS, default=FusionConfig.text_residual,
                   help="how the text joins the image path: 'zero' starts as the image-only network (default), "
                        "'plain' as the reference, 'gate' through a zero-initialised tanh gate")
    p.add_argument("--no-text-fallback", action="store_true",
                   help="train the text from epoch 1 (default: EPOCHS image-only, then EPOCHS with the report; "
                        "validation keeps the better, so an uninformative report cannot make it worse)")
    p.add_argument("--augment", action="store_true",
                   help="rot90/flip/rotation augmentation (off by default: flips contradict left/right in reports)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="random seed (labeled subset, shuffles)")
    p.add_argument("--device", help=DEVICE_HELP)

    p = add("evaluate", cmd_evaluate, "per-image Dice and IoU of a model on a dataset split",
            "fasttextdiff evaluate --model runs/model --data data/synth --split test --json eval.json")
    p.add_argument("--model", required=True, type=Path, help="a model directory (or a published root)")
    p.add_argument("--data", required=True, type=Path, help="LViT-layout root")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to score (default test)")
    p.add_argument("--n-noise", type=int, default=1, help="noise draws averaged per image")
    p.add_argument("--json", type=Path, help="write all figures, per image too, to this file")
    p.add_argument("--device", help=DEVICE_HELP)
    add_precision_argument(p)

    p = add("segment", cmd_segment, "segment a 2D image or 3D volume, conditioned on its report",
            'fasttextdiff segment ct.nii.gz --report-file report.txt --model runs/model --out mask.nii.gz')
    p.add_argument("image", type=Path, help="PNG/JPEG/TIFF/DICOM file, DICOM series folder, NIfTI or NRRD volume")
    rep = p.add_mutually_exclusive_group()
    rep.add_argument("--report", help="the report text")
    rep.add_argument("--report-file", help="a UTF-8 text file with the report")
    p.add_argument("--model", required=True, type=Path, help="a model directory (or a published root)")
    p.add_argument("--out", required=True, type=Path, help="mask file (.png for 2D, .nii.gz/.nrrd for volumes)")
    p.add_argument("--uncertainty", type=Path,
                   help="also write the uncertainty map here: the largest std over the noise draws of a foreground "
                        "class probability (0..0.5); .png/.jpg scale it x510 to 0..255, other formats keep float32")
    p.add_argument("--overlay", type=Path, help="also write a PNG of the image with the mask in colour (volumes: the "
                                                "slice with the most foreground)")
    p.add_argument("--n-noise", type=int, default=4, help="noise draws (the uncertainty is their spread)")
    p.add_argument("--uncertainty-estimate", choices=("draws", "softmax"), default="draws",
                   help="draws: spread over the n-noise draws; softmax: one draw, sqrt(p(1-p)) (n-noise times "
                        "cheaper)")
    p.add_argument("--device", help=DEVICE_HELP)
    add_precision_argument(p)

    p = add("bench", cmd_bench, "run a built-in benchmark (ablation: text vs no_text on the text-necessary set)",
            "fasttextdiff bench ablation --quick --json bench/results/ablation.json")
    p.add_argument("name", choices=("ablation",), help="the benchmark to run")
    p.add_argument("--quick", action="store_true", help="CPU-sized run (under 10 minutes on 2 cores)")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--work-dir", type=Path, help="keep data and models here (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", help=DEVICE_HELP)

    p = add("run-job", cmd_run_job, "run a training job described in JSON (what the server launches on several GPUs)",
            "accelerate launch --multi_gpu --num_processes 2 -m fasttextdiff.commands.main run-job job.json")
    p.add_argument("job", type=Path, help="a JSON job (see fasttextdiff.training.workflows.run_job)")

    p = add("demo", cmd_demo, "the whole pipeline end to end on synthetic data (make demo)",
            "fasttextdiff demo --out runs/demo")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for data, models and results")
    p.add_argument("--device", help=DEVICE_HELP)

    # commands whose modules import torch/MONAI at the top: loaded only when that command is run (or
    # asked for --help), so that a mistyped argument of any command is answered at once
    for name, (module, adder, runner, help_, example) in LAZY_COMMANDS.items():
        p = add(name, _lazy(module, runner), help_, example)
        if only is None or only == name:
            getattr(importlib.import_module(module), adder)(p)
    return parser


def _quiet_third_party() -> None:
    """Our own tqdm bars say what runs; transformers' per-load bars are noise on every command."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    apply_process_defaults()  # offline unless the user opts in (see README), before torch loads
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_of(argv) or "")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except FastTextDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:  # configuration combinations, missing inputs
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

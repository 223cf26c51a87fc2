"""`fasttextdiff reproduce`: its arguments, and the run over the library's reproduction grid."""

from __future__ import annotations

from pathlib import Path

from fasttextdiff.commands.main import _indices, add_text_arguments, text_config_from_args, train_settings
from fasttextdiff.config import SegmenterConfig, TrainConfig
from fasttextdiff.experiments.paper import DATASETS
from fasttextdiff.experiments.reproduce import markdown_table, reproduce


def _floats(text: str) -> tuple[float, ...]:
    import argparse

    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated fractions, e.g. 0.25,0.5,1, got "
                                         f"{text!r}") from None


def add_reproduce_arguments(p) -> None:
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="whose paper preset and anchors to use")
    p.add_argument("--data", required=True, type=Path, help="the dataset's LViT-layout root (Train/Val/Test_Folder)")
    p.add_argument("--backbone", required=True, type=Path,
                   help="a converted ADM backbone (fasttextdiff convert-backbone)")
    p.add_argument("--out", required=True, type=Path, help="folder for the runs and results.json/.md/.png")
    add_text_arguments(p)
    p.add_argument("--labeled", type=_floats, default=(0.25, 0.5, 1.0),
                   help="fractions of the training labels, comma-separated (default 0.25,0.5,1.0)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per fraction (0..N-1; default 1)")
    g = p.add_argument_group("overrides of the paper preset (for tiny runs or ablations)")
    g.add_argument("--epochs", type=int, help="training epochs (default: the preset's, 50/100/50)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default: the preset's, 1e-4)")
    g.add_argument("--image-size", type=int, help="model input size in pixels (default: the preset's, 256)")
    g.add_argument("--timesteps", type=_indices, help="feature timesteps of 1000 (default: the preset's, 50,150,250)")
    g.add_argument("--taps", type=_indices, help="ADM output_blocks to tap (default: the preset's)")
    g.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help=f"images per step (default {TrainConfig.batch_size})")
    g.add_argument("--fusion-dim", type=int, default=256,
                   help="fusion width (default 256, the benchmarks' paper scale)")
    g.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    g.add_argument("--head-channels", type=int, default=SegmenterConfig.head_channels,
                   help=f"channels of the conv head (default {SegmenterConfig.head_channels})")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")


def run_reproduce(args) -> int:
    from fasttextdiff.config import FusionConfig

    args.preset, args.labeled_fraction = f"paper-{args.dataset}", args.labeled
    args.labeled, args.seed, args.augment = None, 0, False
    train_config, overrides = train_settings(args)
    segmenter = SegmenterConfig(head_channels=args.head_channels,
                                fusion=FusionConfig(dim=args.fusion_dim, heads=args.heads))
    text = text_config_from_args(args)
    result = reproduce(args.dataset, args.data, args.backbone, args.out, text_config=text, segmenter_config=segmenter,
                       train_config=train_config, backbone_overrides=overrides, labeled=args.labeled_fraction,
                       seeds=args.seeds, device=args.device, report=print)
    print(markdown_table(result))
    print(f"wrote {args.out / 'results.json'}, results.md and results.png")
    return 0

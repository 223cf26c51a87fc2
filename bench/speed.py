"""Speed: FastTextDiff against reference-style pipelines at equal model size, in one run.

1. Training throughput: our loop (`train_segmenter`: batches of 8, each report encoded once, frozen
   backbone features cached) versus the TextDiff-style loop (`baselines.textdiff_style_train`: batch
   size 1, the text encoder re-run on every sample, the backbone re-run on every augmented image, no
   cache) - same backbone, fusion, head and text encoder (the real all-MiniLM-L6-v2, the BERT role).
   Ours is timed end to end (encoder load, report encoding, feature caching, every epoch, saving);
   the reference only inside its loop. Measured at the accuracy benchmark's configuration (64 px,
   widths 16/32/64, 40 epochs) and at the paper's input size (256 px).
2. Inference latency per 2D image (256x256) and per 3D volume (48x512x512, resampled slice-wise to
   256 px as `Segmenter.segment` does): ours (one U-Net pass per probe timestep, three timesteps batched,
   report encoded per request) versus a MedSegDiff-style iterative sampler on the same U-Net
   (`baselines.IterativeSampler`, 50 DDIM steps timed, the per-step cost extrapolated to MedSegDiff's
   1000 steps).
3. The physical floor: FLOPs per image (torch.utils.flop_counter) over this machine's measured matmul
   rate, and each measured latency as a multiple of its floor.
4. The text-encoder figures from bench/text_speed.py (bench/results/text_speed.json), quoted.

GPU rows are measured only where CUDA is present (AMP); otherwise they say "not measured".

    python bench/speed.py --quick        # a few minutes on 2 CPU cores
    python bench/speed.py                # more repeats and images
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common

INFER_WIDTHS = (32, 64, 128, 128)  # the accuracy FULL plan's backbone at the paper's 256 px
PAPER_TAPS = (32, 64, 128, 128, 256)  # 5 levels: up-blocks at 32/64/128/256/256 px; taps 0-2 = 32..128 px
TRAIN_CONFIGS = {
    # name: (size, widths, fusion_dim, n_images, epochs ours, images for the reference loop, feature_blocks)
    "64px": (64, (16, 32, 64), 32, 64, 40, 64, ()),
    "256px": (256, INFER_WIDTHS, 64, 16, 10, 16, ()),
    # the paper's tapping: decoder features up to 1/2 resolution (16..128 px for a 256 input), none at full size
    "256px_taps_to_128": (256, PAPER_TAPS, 64, 16, 10, 16, (0, 1, 2)),
}
TINY_TRAIN = {"64px": (32, (8, 16), 8, 4, 2, 2, ())}  # smoke test only
PAPER_TAPS_MODEL = (PAPER_TAPS, (0, 1, 2))  # (widths, up-blocks tapped): features up to 1/2 resolution
TINY_PAPER_TAPS = ((8, 16, 16), (0, 1))  # smoke test only
QUICK_TRAIN = {"64px": (64, (16, 32, 64), 32, 64, 40, 32, ()), "256px": (256, INFER_WIDTHS, 64, 8, 10, 8, ()),
               "256px_taps_to_128": (256, PAPER_TAPS, 64, 8, 10, 8, (0, 1, 2))}


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rate(n: int = 2048, repeats: int = 5) -> dict:
    """fp32 GFLOP/s of a large torch.matmul at the current thread count (best of `repeats`)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    timing = common.time_calls(lambda: torch.matmul(a, b), repeats=repeats, warmup=1)
    return {"n": n, "gflops_best": 2 * n**3 / timing["min_s"] / 1e9,
            "gflops_median": 2 * n**3 / timing["median_s"] / 1e9,
            **timing}


def conv_rate(repeats: int = 5) -> dict:
    """fp32 GFLOP/s of a large 3x3 convolution (oneDNN) at the current thread count (best of `repeats`).

    Measured beside the matmul because on this AMD CPU MKL's sgemm takes a slower code path than
    oneDNN's convolutions (about 110 vs 230 GFLOP/s on one thread): the matmul rate alone would put the
    "floor" above what the U-Net actually achieves.
    """
    import torch
    import torch.nn.functional as F

    x, w = torch.randn(3, 64, 128, 128), torch.randn(64, 64, 3, 3)
    flops = 2 * 9 * 64 * 64 * 128 * 128 * 3
    with torch.inference_mode():
        timing = common.time_calls(lambda: F.conv2d(x, w, padding=1), repeats=repeats, warmup=1)
    return {"shape": "3x64x128x128 * 64x64x3x3", "gflops_best": flops / timing["min_s"] / 1e9, **timing}


def conv_rate_low_precision(repeats: int = 3) -> dict:
    """The 3x3 convolution of `conv_rate` under reduced-precision autocast (bf16 on CPU): is it native here?"""
    import torch
    import torch.nn.functional as F

    from fasttextdiff.inference.batched import native_low_precision

    x, w = torch.randn(2, 64, 32, 32), torch.randn(64, 64, 3, 3)  # small: emulated bf16 is ~100x slower
    flops = 2 * 9 * 64 * 64 * 32 * 32 * 2
    with torch.inference_mode():
        fp32 = common.time_calls(lambda: F.conv2d(x, w, padding=1), repeats=repeats * 3, warmup=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            timing = common.time_calls(lambda: F.conv2d(x, w, padding=1), repeats=repeats, warmup=1)
    return {"dtype": "bfloat16", "shape": "2x64x32x32 * 64x64x3x3",
            "native": native_low_precision(torch.device("cpu")) is not None,
            "gflops_best": flops / timing["min_s"] / 1e9, "fp32_same_shape_gflops_best": flops / fp32["min_s"] / 1e9,
            **timing}


def truncation_flops(size: int = 256, widths=PAPER_TAPS, taps=(0, 1, 2)) -> dict:
    """Verifies the truncated forward: FLOPs of `features()` (stops after the last tapped up-block) vs the
    whole U-Net on the same three-timestep batch, for the paper's taps and for all blocks tapped."""
    import torch

    from fasttextdiff.models.backbone import DiffusionBackbone
    from fasttextdiff.config import BackboneConfig

    out = {}
    for label, blocks in (("paper_taps", tuple(taps)), ("all_blocks", ())):
        bb = DiffusionBackbone(BackboneConfig(image_size=size, block_out_channels=tuple(widths),
                                              feature_blocks=blocks))
        x = torch.zeros(1, 1, size, size)
        t = torch.tensor(bb.schedule_timesteps)
        with torch.inference_mode():
            features = flops_of(lambda: bb.features(x))
            full = flops_of(lambda: bb.unet(x.repeat(len(t), 1, 1, 1), t, return_dict=False))
        out[label] = {"feature_blocks": list(blocks) or "all", "features_gflop": features / 1e9,
                      "full_unet_gflop": full / 1e9,
                      "saved_fraction": 1 - features / full}
    out["widths"] = list(widths)
    return out


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def train_comparison(name: str, spec, work: Path, device, rounds: int = 1) -> dict:
    import torch

    import baselines
    from fasttextdiff.models.backbone import DiffusionBackbone
    from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.data.synthetic import make_lvit_dataset
    from fasttextdiff.utils.devices import resolve_device
    from fasttextdiff.models.segmenter import FastTextDiffModel
    from fasttextdiff.training.workflows import load_lvit
    from fasttextdiff.text.encoder import TextEncoder
    from fasttextdiff.training.segmenter import train_segmenter

    size, widths, fusion_dim, n_images, epochs, ref_images, feature_blocks = spec
    root = make_lvit_dataset(work / f"data_{name}", variant="text-necessary", n_train=n_images, n_val=0, n_test=0,
                             size=size, seed=0)
    samples = load_lvit(root)["train"]
    backbone_dir = work / f"backbone_{name}"
    DiffusionBackbone(BackboneConfig(image_size=size, block_out_channels=widths,
                                     feature_blocks=feature_blocks)).save_pretrained(backbone_dir)
    text_cfg = TextConfig(encoder=str(common.minilm_path()))
    seg_cfg = SegmenterConfig(fusion=FusionConfig(dim=fusion_dim, heads=4))

    encoder = TextEncoder(text_cfg, device=resolve_device(device))
    backbone = DiffusionBackbone.from_pretrained(backbone_dir)
    init = FastTextDiffModel(backbone, encoder.hidden_size, seg_cfg).state_dict()

    def run_ours(r: int) -> dict:
        """Everything train_segmenter does, timed from the call to the published model directory."""
        t0 = time.perf_counter()
        metrics = train_segmenter(samples, work / f"model_{name}_{r}", backbone_dir=backbone_dir, text_config=text_cfg,
                                  segmenter_config=seg_cfg,
                                  train_config=TrainConfig(epochs=epochs, batch_size=8, lr=1e-3, seed=r),
                                  device=device, progress=False)
        seconds = time.perf_counter() - t0
        return {"images": n_images * epochs, "seconds": seconds, "images_per_s": n_images * epochs / seconds,
                "seconds_per_epoch": seconds / epochs, "batch_size": 8, "epochs": epochs,
                "feature_cache": metrics["feature_cache"], "trainable_parameters": metrics["trainable_parameters"],
                "includes": "encoder load, report encoding, feature caching, all epochs, saving"}

    def run_reference(max_tokens, r: int) -> dict:
        """The same network and encoder through the TextDiff loop (only the loop is timed)."""
        torch.manual_seed(0)
        fresh = FastTextDiffModel(DiffusionBackbone.from_pretrained(backbone_dir), encoder.hidden_size, seg_cfg)
        fresh.load_state_dict(init)
        ref = baselines.textdiff_style_train(fresh, samples, encoder, n_images=ref_images, max_tokens=max_tokens,
                                             seed=r)
        ref["seconds_per_epoch"] = n_images / ref["images_per_s"]
        return ref

    # Rounds of (ours, reference, reference with 10 tokens) back to back, so each pair sees similar load;
    # the best throughput of each loop over the rounds is the headline, the per-round ratios show the spread.
    per_round, ours_runs, ref_runs = [], [], {"full_report": [], "10_tokens": []}
    for r in range(rounds):
        o = run_ours(r)
        f = run_reference(None, r)
        t = run_reference(10, r)
        ours_runs.append(o)
        ref_runs["full_report"].append(f)
        ref_runs["10_tokens"].append(t)
        per_round.append(o["images_per_s"] / f["images_per_s"])
    ours = max(ours_runs, key=lambda x: x["images_per_s"])
    rows = {k: max(v, key=lambda x: x["images_per_s"]) for k, v in ref_runs.items()}
    metrics = {"trainable_parameters": ours["trainable_parameters"]}
    backbone_params = sum(p.numel() for p in backbone.parameters())
    return {
        "config": {"size": size, "widths": list(widths), "fusion_dim": fusion_dim, "images": n_images,
                   "feature_blocks": list(feature_blocks) or "all", "feature_sizes": backbone.feature_sizes,
                   "text_encoder": "all-MiniLM-L6-v2 (real weights) in both loops",
                   "backbone_parameters": backbone_params, "trainable_parameters": metrics["trainable_parameters"]},
        "ours": ours,
        "textdiff_style": rows,
        "speedup": ours["images_per_s"] / rows["full_report"]["images_per_s"],
        "speedup_vs_10_token_reference": ours["images_per_s"] / rows["10_tokens"]["images_per_s"],
        "speedup_per_round": per_round,
        "rounds": rounds,
    }


# ------------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------------


def build_inference_model(work: Path, device, size: int = 256, widths=INFER_WIDTHS, feature_blocks=(),
                          name: str = "model_infer") -> Path:
    """A 256 px FastTextDiff model directory through the public path (random backbone: speed only)."""
    from fasttextdiff.models.backbone import DiffusionBackbone
    from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.data.synthetic import make_lvit_dataset
    from fasttextdiff.training.workflows import load_lvit
    from fasttextdiff.training.segmenter import train_segmenter

    root = make_lvit_dataset(work / "data_infer", variant="standard", n_train=2, n_val=0, n_test=0, size=max(32, size),
                             seed=0)
    backbone = work / f"bb_{name}"
    DiffusionBackbone(BackboneConfig(image_size=size, block_out_channels=tuple(widths),
                                     feature_blocks=tuple(feature_blocks))).save_pretrained(backbone)
    train_segmenter(load_lvit(root)["train"], work / name, backbone_dir=backbone,
                    text_config=TextConfig(encoder="tiny"),
                    segmenter_config=SegmenterConfig(fusion=FusionConfig(dim=64)),
                    train_config=TrainConfig(epochs=1, batch_size=2), device=device, progress=False)
    return work / name


def inference_comparison(work: Path, quick: bool, device, size: int = 256, widths=INFER_WIDTHS,
                         volume_shape=(48, 512, 512)) -> dict:
    import torch

    import baselines
    from fasttextdiff.data.io import Image
    from fasttextdiff.data.preprocess import to_model_input
    from fasttextdiff.inference.pipeline import Segmenter

    model_dir = build_inference_model(work, device, size, widths)
    seg = Segmenter.load(model_dir, device=device, n_noise=1, batch_size=16)
    rng = np.random.default_rng(0)
    image2d = Image(rng.integers(0, 255, (size, size), dtype=np.uint8), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0),
                    False)
    counter = {"i": 0}

    def report() -> str:  # a new report every call: the text encoder runs every time (no cache hit)
        counter["i"] += 1
        return f"Unilateral pulmonary infection, one infected area, lower left lung (request {counter['i']})."

    repeats = 4 if quick else 10
    backbone = seg.model.backbone
    x = to_model_input(image2d, size, 1, None).to(seg.device)
    sampler = baselines.IterativeSampler(backbone, steps=50, device=seg.device)
    t_step = torch.tensor([500], device=seg.device)

    def one_step():
        with torch.inference_mode():
            sampler.unet(torch.cat([x, x], 1), t_step, return_dict=False)

    # Interleaved (ours, one sampler step, ours, ...) so both see the same machine load; best of each.
    seg.segment(image2d, report(), n_noise=1)
    one_step()
    ours_times, step_times = [], []
    for _ in range(repeats):
        ours_times.append(common.time_calls(lambda: seg.segment(image2d, report(), n_noise=1), repeats=1,
                                            warmup=0)["min_s"])
        step_times.append(common.time_calls(one_step, repeats=1, warmup=0)["min_s"])
    ours1 = {"min_s": min(ours_times), "median_s": float(np.median(ours_times)), "repeats": repeats,
             "times_s": [round(t, 5) for t in ours_times]}
    step = {"min_s": min(step_times), "median_s": float(np.median(step_times)), "repeats": repeats,
            "times_s": [round(t, 5) for t in step_times]}
    ours4 = common.time_calls(lambda: seg.segment(image2d, report(), n_noise=4), repeats=max(2, repeats // 2))
    ddim = common.time_calls(lambda: sampler.sample(x), repeats=1 if quick else 2, warmup=0)
    per_step = step["min_s"]
    medsegdiff_1000 = per_step * 1000

    # physical floor: FLOPs per image at this machine's matmul rate
    states = seg.encoder.encode([report()])
    with torch.inference_mode():
        backbone_flops = flops_of(lambda: backbone.features(x))
        model_flops = flops_of(lambda: seg.model(x, states.states, states.mask))
        step_flops = flops_of(lambda: sampler.unet(torch.cat([x, x], 1), t_step, return_dict=False))

    # 3D volume: 48 x 512 x 512, slice-wise at 256 px, batches of 16 slices
    depth = volume_shape[0]
    volume = Image(rng.integers(0, 255, tuple(volume_shape), dtype=np.uint8).astype(np.int16), (0.7, 0.7, 2.5),
                   (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), True)
    vol = common.time_calls(lambda: seg.segment(volume, report(), n_noise=1), repeats=1 if quick else 3, warmup=0)
    xs = torch.zeros(16, 1, size, size, device=seg.device)
    one_step16 = common.time_calls(
        lambda: sampler.unet(torch.cat([xs, xs], 1), t_step, return_dict=False), repeats=2 if quick else 3)
    vol_iter_1000 = one_step16["min_s"] * (depth / 16) * 1000
    vol_iter_50 = one_step16["min_s"] * (depth / 16) * 50

    return {
        "config": {"size": size, "widths": list(widths), "timesteps": list(backbone.config.timesteps),
                   "text_encoder": "tiny ModernBERT, a fresh report per request (no cache hit)",
                   "backbone_parameters": sum(p.numel() for p in backbone.parameters()),
                   "sampler_parameters": sum(p.numel() for p in sampler.unet.parameters())},
        "ours_2d_n_noise_1": ours1,
        "ours_2d_n_noise_4": ours4,
        "iterative_ddim_50": ddim,
        "iterative_step_interleaved": step,
        "iterative_per_step_s": per_step,
        "iterative_per_step_s_from_ddim_50": ddim["min_s"] / 50,
        "medsegdiff_1000_steps_s (extrapolated)": medsegdiff_1000,
        "speedup_vs_ddim_50": ddim["min_s"] / ours1["min_s"],
        "speedup_vs_1000_steps": medsegdiff_1000 / ours1["min_s"],
        "speedup_vs_1000_steps_median": step["median_s"] * 1000 / ours1["median_s"],
        "speedup_vs_1000_steps_with_uncertainty_n4": medsegdiff_1000 / ours4["min_s"],
        "volume": {"shape": list(volume_shape), "ours_n_noise_1": vol,
                   "iterative_step_batch16": one_step16,
                   "iterative_50_steps_s (extrapolated)": vol_iter_50,
                   "iterative_1000_steps_s (extrapolated)": vol_iter_1000,
                   "speedup_vs_1000_steps": vol_iter_1000 / vol["min_s"]},
        "flops": {"backbone_features_per_image": backbone_flops, "model_forward_per_image": model_flops,
                  "iterative_step_per_image": step_flops,
                  "medsegdiff_1000_steps_per_image": step_flops * 1000},
    }


# ------------------------------------------------------------------------------------------------
# the fast inference path: ablation, volume with uncertainty, Dice and ranking checks
# ------------------------------------------------------------------------------------------------


def ablation_configs() -> list[tuple[str, dict, int | None]]:
    """(row, InferenceOptions fields, threads) - cumulative from the old path, then one measure off at a time."""
    ref = {"batch_draws": False, "channels_last": False, "precision": "fp32", "skip_air": False,
           "reference_path": True}
    fast = {}  # the library default
    return [
        ("reference path (SliceInferer over model.predict, one forward per draw), 1 thread", ref, 1),
        ("+ draws batched with the timesteps (fast core, fp32, NCHW, no air skip)",
         {"channels_last": False, "skip_air": False, "precision": "fp32"}, 1),
        ("+ channels_last", {"skip_air": False, "precision": "fp32"}, 1),
        ("+ skip air slices (library default), 1 thread", fast, 1),
        ("library default, 2 threads", fast, 2),
        ("library default without batched draws, 2 threads", {"batch_draws": False}, 2),
        ("library default without channels_last, 2 threads", {"channels_last": False}, 2),
        ("softmax uncertainty (one draw), 2 threads", {"uncertainty": "softmax"}, 2),
    ]


def demo_volume(depth: int, size: int, air_slices: int, rng) -> "np.ndarray":
    """A CT-like int16 volume: a noisy body ellipse in air (-1000 HU), the first `air_slices` slices above the body."""
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.38 * size)) ** 2 + ((xx - size / 2) / (0.45 * size)) ** 2 <= 1
    vol = np.full((depth, size, size), -1000, dtype=np.int16)
    tissue = rng.normal(40, 120, (depth, size, size)).clip(-900, 1500).astype(np.int16)
    vol[air_slices:][:, body] = tissue[air_slices:][:, body]
    return vol


def fast_inference_section(work: Path, quick: bool, device, threads_fast: int, size: int = 256, widths=INFER_WIDTHS,
                           volume_shape=(48, 512, 512), mini_depth: int = 4, measured_depth: int | None = None,
                           repeats: int | None = None, paper_taps=PAPER_TAPS_MODEL,
                           paper_taps_depth: int = 12) -> dict:
    """Ablation on a small CT-like slab (one air slice), then the full volume with uncertainty, fast path."""
    import torch

    from fasttextdiff.data.io import Image
    from fasttextdiff.inference.batched import InferenceOptions, native_low_precision
    from fasttextdiff.inference.pipeline import Segmenter

    model_dir = work / "model_infer"
    if not model_dir.is_dir():
        build_inference_model(work, device, size, widths)
    seg = Segmenter.load(model_dir, device=device, n_noise=4, batch_size=16)
    rng = np.random.default_rng(1)
    spacing, origin, direction = (0.7, 0.7, 2.5), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    slab = Image(demo_volume(mini_depth, volume_shape[1], 1, rng), spacing, origin, direction, True)
    report = "Unilateral pulmonary infection, one infected area, lower left lung."
    rows = []
    repeats = repeats or (2 if quick else 3)
    seg.segment(slab, report, n_noise=1)  # warm-up (oneDNN primitives, the text encoder)
    for name, fields, threads in ablation_configs():
        torch.set_num_threads(threads)
        seg.options = InferenceOptions(**fields)
        seg.segment(slab, report, n_noise=1)  # the layout switch and its primitives, untimed
        timing = common.time_calls(lambda: seg.segment(slab, report, n_noise=4), repeats=repeats, warmup=0)
        rows.append({"configuration": name, "threads": threads, "options": fields, **timing,
                     "seconds_per_slice": timing["min_s"] / mini_depth})
        print(f"[speed] ablation: {name}: {timing['min_s']:.2f} s", flush=True)
    base = rows[0]["min_s"]
    for r in rows:
        r["speedup_vs_reference"] = base / r["min_s"]

    torch.set_num_threads(threads_fast)
    seg.options = InferenceOptions()
    depth = measured_depth or volume_shape[0]
    volume = Image(demo_volume(depth, volume_shape[1], 0, rng), spacing, origin, direction, True)
    vol = {}
    for label, n_noise, kind in (("draws_n_noise_4", 4, "draws"), ("draws_n_noise_2", 2, "draws"),
                                 ("softmax_one_draw", 1, "softmax")):
        seg.options = InferenceOptions(uncertainty=kind)
        timing = common.time_calls(lambda: seg.segment(volume, report, n_noise=n_noise), repeats=1, warmup=0)
        vol[label] = scaled_to_depth(timing, depth, volume_shape[0])
        print(f"[speed] volume {volume_shape} uncertainty {label}: {vol[label]['min_s']:.1f} s", flush=True)
    seg.options = InferenceOptions()
    paper = paper_taps_volume(work, device, size, paper_taps, volume_shape, report, spacing, origin, direction,
                              min(depth, paper_taps_depth), rng)
    vol["paper_taps_draws_n_noise_2"] = paper.pop("timing")
    return {"paper_taps_model": paper, "ablation": rows, "ablation_slab": [mini_depth, *volume_shape[1:]],
            "ablation_n_noise": 4,
            "volume": vol, "volume_shape": list(volume_shape), "threads": threads_fast,
            "native_low_precision": str(native_low_precision(seg.device)),
            "precision": seg.inference_settings,  # what the rows above ran in (FASTTEXTDIFF_PRECISION, else auto)
            "note": "every volume slice holds body (a chest slab), so air skipping saves nothing there; the slab's "
                    "first slice is air to show "
                    "it" + (f"; the volume was measured on {depth} of its {volume_shape[0]} "
                                                       "slices and scaled linearly (slice-wise inference)"
                                                       if depth != volume_shape[0] else "")}


def scaled_to_depth(timing: dict, measured: int, full: int) -> dict:
    """A volume timed on `measured` slices, scaled to `full` (slice-wise inference is linear in the depth)."""
    scale = full / measured
    return {**timing, "measured_depth": measured, "min_s": timing["min_s"] * scale,
            "median_s": timing["median_s"] * scale, "measured_s": timing["min_s"]}


def forward_inputs(seg, size: int, report: str = "one infected area, lower left lung") -> tuple:
    """(image batch of one, encoded report) for timing or counting one 2D forward of a loaded Segmenter."""
    import torch

    return torch.zeros(1, seg.model.backbone.config.in_channels, size, size), seg.encoder.encode([report])


def forward_flops(seg, size: int) -> int:
    import torch

    x, states = forward_inputs(seg, size)
    with torch.inference_mode():
        return flops_of(lambda: seg.model(x, states.states, states.mask))


def paper_taps_volume(work: Path, device, size: int, paper_taps, volume_shape, report: str, spacing, origin, direction,
                      depth: int, rng) -> dict:
    """The volume with 2-draw uncertainty on the paper's tapping: a 5-level backbone read up to 1/2 resolution,
    so `features()` stops before the full-resolution decoder (the truncated forward). Measured on `depth`
    slices and scaled to the volume's (slice-wise inference is linear in the depth)."""
    from fasttextdiff.data.io import Image
    from fasttextdiff.inference.pipeline import Segmenter

    widths, taps = paper_taps
    model_dir = build_inference_model(work, device, size, widths, feature_blocks=taps, name="model_infer_paper_taps")
    seg = Segmenter.load(model_dir, device=device, n_noise=2, batch_size=16)
    flops = forward_flops(seg, size)
    slab = Image(demo_volume(2, volume_shape[1], 0, rng), spacing, origin, direction, True)
    seg.segment(slab, report, n_noise=1)  # warm-up
    volume = Image(demo_volume(depth, volume_shape[1], 0, rng), spacing, origin, direction, True)
    timing = scaled_to_depth(common.time_calls(lambda: seg.segment(volume, report, n_noise=2), repeats=1, warmup=0),
                             depth, volume_shape[0])
    print(f"[speed] volume {volume_shape} paper taps, 2 draws: {timing['min_s']:.1f} s", flush=True)
    return {"widths": list(widths), "feature_blocks": list(taps), "model_forward_flops_per_image": flops,
            "timing": timing}


def floor_breakdown(model, x, states, rate_gflops: float, repeats: int = 3) -> dict:
    """Where the 2D forward's time goes: convolutions by kernel (timed by hooks, one thread) and the rest.

    Why: the floor counts every FLOP at the best rate measured on one op (a large 3x3 convolution, for
    which oneDNN runs a Winograd-style algorithm: it counts more FLOPs than it executes, so that rate is
    above this CPU's direct-FMA peak). 1x1 convolutions, attention and the FLOP-free ops (norms,
    activations, resampling, copies) cannot reach it; this measures how much of the latency they are.
    """
    import torch

    kinds: dict[str, dict] = {}
    stack = []

    def pre(module, inputs):
        stack.append(time.perf_counter())

    def post(module, inputs, output):
        seconds = time.perf_counter() - stack.pop()
        kh, kw = module.kernel_size
        kind = f"conv {kh}x{kw}" + (f" stride {module.stride[0]}" if module.stride[0] != 1 else "")
        n, _, h, w = output.shape
        flops = 2 * n * module.out_channels * h * w * (module.in_channels // module.groups) * kh * kw
        entry = kinds.setdefault(kind, {"seconds": 0.0, "gflop": 0.0, "calls": 0})
        entry["seconds"] += seconds
        entry["gflop"] += flops / 1e9
        entry["calls"] += 1

    from fasttextdiff.inference.batched import set_memory_format

    set_memory_format(model, True)  # as the library's fast path runs
    x = x.contiguous(memory_format=torch.channels_last)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [h for m in convs for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    best = None
    try:
        with torch.inference_mode():
            model(x, states.states, states.mask)  # warm-up
            for _ in range(repeats):
                kinds.clear()
                t0 = time.perf_counter()
                model(x, states.states, states.mask)
                total = time.perf_counter() - t0
                if best is None or total < best[0]:
                    best = (total, {k: dict(v) for k, v in kinds.items()})
    finally:
        for h in handles:
            h.remove()
    total, kinds = best
    conv_s = sum(v["seconds"] for v in kinds.values())
    conv_gflop = sum(v["gflop"] for v in kinds.values())
    for v in kinds.values():
        v["gflops_per_s"] = v["gflop"] / v["seconds"] if v["seconds"] else None
    return rebase_breakdown({"forward_s": total, "conv_s": conv_s, "other_s": total - conv_s, "conv_gflop": conv_gflop,
                             "by_kind": kinds}, rate_gflops)


def rebase_breakdown(fb: dict, rate_gflops: float) -> dict:
    """The breakdown's floor at the best one-thread rate the run showed: the rate given, or a convolution kind's
    own rate inside the forward if that was higher (a machine whose speed drifts during a long run)."""
    rate = max([rate_gflops] + [v["gflops_per_s"] for v in fb["by_kind"].values() if v.get("gflops_per_s")])
    floor = fb["conv_gflop"] / rate
    # every convolution at the best measured rate, everything else as it runs now (eager PyTorch)
    fb.update(rate_gflops=rate, conv_floor_s=floor, best_case_over_floor=(floor + fb["other_s"]) / floor)
    return fb


def breakdown_of_saved_model(model_dir: Path, device, size: int, rate_gflops: float) -> dict:
    """`floor_breakdown` of the benchmark's inference model, loaded fresh (its own memory format)."""
    from fasttextdiff.inference.pipeline import Segmenter

    seg = Segmenter.load(model_dir, device=device)
    return floor_breakdown(seg.model, *forward_inputs(seg, size), rate_gflops)


def hardware_rows(result: dict, model_dir: Path, device, size: int, rate_gflops: float, tiny: bool) -> None:
    """Where the forward's time goes against the floor, the CPU's vector ISA, the truncated forward's saving
    and the reduced-precision rate: the evidence behind the goals the hardware decides."""
    common.set_threads(1)  # the floor's rate is the one-thread convolution rate
    result["floor_breakdown"] = breakdown_of_saved_model(model_dir, device, size, rate_gflops)
    result["cpu_isa"] = common.cpu_isa()
    result["truncation"] = truncation_flops(*(() if not tiny else (32, *TINY_PAPER_TAPS)))
    result["conv_bf16"] = conv_rate_low_precision()


def fast_2d_latency(work: Path, device, threads: int, size: int = 256, repeats: int = 4) -> dict:
    """2D 256 px latency of the library default with and without uncertainty (fresh report per call)."""
    import torch

    from fasttextdiff.data.io import Image
    from fasttextdiff.inference.batched import InferenceOptions
    from fasttextdiff.inference.pipeline import Segmenter

    torch.set_num_threads(threads)
    seg = Segmenter.load(work / "model_infer", device=device, n_noise=4, batch_size=16)
    rng = np.random.default_rng(0)
    image = Image(rng.integers(0, 255, (size, size), dtype=np.uint8), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0),
                  False)
    counter = {"i": 0}

    def report() -> str:
        counter["i"] += 1
        return f"Unilateral pulmonary infection, lower left lung (request {counter['i']})."

    out = {"threads": threads}
    for label, n_noise, kind in (("n_noise_1", 1, "draws"), ("n_noise_4_draws", 4, "draws"),
                                 ("n_noise_2_draws", 2, "draws"), ("softmax_uncertainty", 1, "softmax")):
        seg.options = InferenceOptions(uncertainty=kind)
        out[label] = common.time_calls(lambda: seg.segment(image, report(), n_noise=n_noise), repeats=repeats,
                                       warmup=1)
    return out


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def dice_check(work: Path, device, threads: int) -> dict:
    """Accuracy benchmark's test split (quick plan, 50 % labels): Dice of the reference vs the fast path, and
    how well cheaper uncertainty estimates keep the n_noise 4 ranking of the test images (active learning)."""
    import torch

    import accuracy
    from fasttextdiff.inference.evaluate import evaluate_model
    from fasttextdiff.inference.batched import InferenceOptions
    from fasttextdiff.inference.pipeline import Segmenter
    from fasttextdiff.config import FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.training.segmenter import train_segmenter
    from fasttextdiff.training.workflows import load_lvit

    torch.set_num_threads(threads)
    plan = accuracy.QUICK
    args = argparse.Namespace(dataset="text-necessary", data_seed=0, path=None)
    root, plan, window, described = accuracy.prepare_data(args, plan, work / "acc")
    splits = load_lvit(root)
    backbone_dir, _ = accuracy.pretrain(root, splits, plan, window, work / "acc", device)
    fraction = max(plan.budgets)
    from fasttextdiff.data.dataset import select_labeled
    epochs = accuracy.epochs_for(plan, len(select_labeled(splits["train"], fraction, seed=0)))
    model_dir = work / "acc" / "model"
    train_segmenter(splits["train"], model_dir, backbone_dir=backbone_dir, text_config=TextConfig(encoder="tiny"),
                    segmenter_config=SegmenterConfig(fusion=FusionConfig(dim=plan.fusion_dim, heads=4)),
                    train_config=TrainConfig(epochs=epochs, batch_size=plan.batch_size, lr=plan.lr, seed=0,
                                             labeled=fraction, val_every=max(1, epochs // plan.val_checks)),
                    val_samples=splits["val"], device=device, progress=False,
                    text_cache_dir=work / "acc" / "text_cache")
    test = splits["test"]
    seg = Segmenter.load(model_dir, device=device)
    runs = {}
    for label, options, n_noise in (("reference_n1", InferenceOptions.reference(), 1),
                                    ("fast_n1", InferenceOptions(), 1),
                                    ("reference_n4", InferenceOptions.reference(), 4),
                                    ("fast_n4", InferenceOptions(), 4),
                                    ("fast_n2", InferenceOptions(), 2),
                                    ("fast_softmax", InferenceOptions(uncertainty="softmax"), 1)):
        seg.options = options
        t0 = time.perf_counter()
        runs[label] = evaluate_model(seg, test, n_noise=n_noise, progress=False)
        runs[label]["seconds"] = time.perf_counter() - t0
    # the bar's own noise: the reference n_noise 4 ranking from four other draws (noise seeds base+4 .. base+7)
    config = seg.model.backbone.config
    base = config.noise_seed
    config.noise_seed, seg.options = base + 4, InferenceOptions.reference()
    try:
        t0 = time.perf_counter()
        runs["reference_n4_other_draws"] = evaluate_model(seg, test, n_noise=4, progress=False)
        runs["reference_n4_other_draws"]["seconds"] = time.perf_counter() - t0
    finally:
        config.noise_seed = base
    ref_unc = [r["uncertainty_mean"] for r in runs["reference_n4"]["per_image"]]
    ranking = {label: spearman(ref_unc, [r["uncertainty_mean"] for r in runs[label]["per_image"]])
               for label in ("fast_n4", "fast_n2", "fast_softmax", "reference_n4_other_draws")}
    dice = {label: r["dice_mean"] for label, r in runs.items()}
    seg.options = InferenceOptions()
    return {"dataset": described, "split": "test", "n_test": len(test), "labeled_fraction": fraction,
            "fast_precision": seg.inference_settings, "reference_precision": "fp32",
            "epochs": epochs, "dice": dice, "seconds": {k: r["seconds"] for k, r in runs.items()},
            "dice_drop_n1": dice["reference_n1"] - dice["fast_n1"],
            "dice_drop_n4": dice["reference_n4"] - dice["fast_n4"],
            "uncertainty_spearman_vs_reference_n4": ranking}


RANK_AGREEMENT_MIN = 0.9  # Spearman vs the n_noise 4 ranking a cheaper uncertainty must keep to stand in for it
GOALS = {"ct_volume_seconds_with_uncertainty": 30.0, "ct_volume_seconds_with_uncertainty_paper_taps": 30.0,
         "latency_2d_with_uncertainty_s": 0.5, "latency_over_floor_2d": 1.3,
         "train_speedup_vs_textdiff_style_256px": 3.0, "train_speedup_vs_textdiff_style_64px": 4.0}


def headline_fast(result: dict) -> None:
    """The headline figures, each beside its goal (the uncertainty estimate used is named)."""
    fast, f2d, inf = result["fast"], result["fast_2d"], result["inference"]
    ranking = (result.get("dice_check") or {}).get("uncertainty_spearman_vs_reference_n4", {})
    vol_draws = fast["volume"]["draws_n_noise_4"]["min_s"]
    vol_soft = fast["volume"]["softmax_one_draw"]["min_s"]
    vol_two = fast["volume"].get("draws_n_noise_2", {}).get("min_s")
    # the headline: the cheapest estimate whose ranking keeps the bar, fixed before measuring
    for key, seconds, what, row_2d in (("fast_softmax", vol_soft, "softmax sqrt(p(1-p)) of one draw",
                                        "softmax_uncertainty"),
                                       ("fast_n2", vol_two, "std over n_noise 2 draws", "n_noise_2_draws")):
        if seconds is not None and ranking.get(key, -1.0) >= RANK_AGREEMENT_MIN:
            result["ct_volume_seconds_with_uncertainty"] = seconds
            result["latency_2d_with_uncertainty_s"] = f2d.get(row_2d, f2d["n_noise_4_draws"])["min_s"]
            result["ct_volume_uncertainty_estimate"] = (f"{what} (its test ranking agrees with n_noise 4 at Spearman "
                                                        f"{ranking[key]:.3f} >= {RANK_AGREEMENT_MIN})")
            break
    else:
        result["ct_volume_seconds_with_uncertainty"] = vol_draws
        result["latency_2d_with_uncertainty_s"] = f2d["n_noise_4_draws"]["min_s"]
        result["ct_volume_uncertainty_estimate"] = "std over n_noise 4 draws"
    result["ct_volume_seconds_n_noise_4_draws"] = vol_draws
    result["ct_volume_seconds_n_noise_2_draws"] = vol_two
    result["ct_volume_seconds_softmax_uncertainty"] = vol_soft
    paper = fast.get("paper_taps_model")
    if paper:  # the same 2-draw estimate on the paper's tapping (the forward stops at 1/2 resolution)
        result["ct_volume_seconds_with_uncertainty_paper_taps"] = fast["volume"]["paper_taps_draws_n_noise_2"]["min_s"]
    result["latency_2d_s"] = f2d["n_noise_1"]["min_s"]
    result["latency_2d_n_noise_4_s"] = f2d["n_noise_4_draws"]["min_s"]
    rate = max(result["conv_fast_threads"]["gflops_best"],
               result["conv"]["gflops_best"] if fast["threads"] == 1 else 0)
    floor = inf["flops"]["model_forward_per_image"] / (rate * 1e9)
    result["floor_fast"] = {"threads": fast["threads"], "rate_gflops": rate, "floor_s": floor}
    # slice-wise at the model's size: each slice is one 2D forward per draw
    result["ct_volume_floor_s_per_draw"] = fast["volume_shape"][0] * floor
    result["latency_over_floor_2d"] = f2d["n_noise_1"]["min_s"] / floor
    if result.get("floor_breakdown"):  # measured mid-run: rebase on the best one-thread rate of the whole run
        rebase_breakdown(result["floor_breakdown"], result["conv"]["gflops_best"])
    if paper:
        result["ct_volume_floor_s_per_draw_paper_taps"] = (
            fast["volume_shape"][0] * paper["model_forward_flops_per_image"] / (rate * 1e9))
    result["goals"] = {k: {"value": result.get(k), "goal": g,
                           "met": result.get(k) is not None and (result[k] >= g if "speedup" in k else result[k] <= g)}
                       for k, g in GOALS.items()}
    dc = result.get("dice_check")
    if dc:
        result["dice_drop_with_optimisations"] = max(dc["dice_drop_n1"], dc["dice_drop_n4"])
        result["goals"]["dice_drop_with_optimisations"] = {"value": result["dice_drop_with_optimisations"],
                                                           "goal": 0.01,
                                                           "met": result["dice_drop_with_optimisations"] <= 0.01}


def _precision_clause(fast: dict) -> str:
    """What the fast rows computed in: from the run's own record (older JSON without one: the rule as it was)."""
    rec = fast.get("precision")
    if not rec:
        return "so `precision='auto'` stays fp32 here (bf16 only where oneDNN has it natively, fp16 on CUDA)."
    return (f"The fast-path rows ran with precision {rec['precision']!r} on {rec['device']}: {rec['compute_dtype']}"
            f"{'' if rec['native'] else ' (emulated)'} (FASTTEXTDIFF_PRECISION={rec.get('precision_env') or 'unset'}; "
            "auto = bf16 only where oneDNN has it natively, fp16 on CUDA).")


def fast_markdown(result: dict) -> list[str]:
    fast, f2d = result["fast"], result["fast_2d"]
    lines = ["## Fast inference path goals (" + f"{fast['threads']} thread(s))", "",
             common.markdown_table(["figure", "value", "goal", "met"],
                                   [[k, g["value"], ("<= " if "speedup" not in k else ">= ") + str(g["goal"]),
                                     g["met"]]
                                    for k, g in result["goals"].items()], ["---", "---:", "---:", "---"]), "",
             f"Volume uncertainty estimate in the headline: {result['ct_volume_uncertainty_estimate']}. "
             f"Volume {fast['volume_shape']}: std over 4 draws {result['ct_volume_seconds_n_noise_4_draws']:.1f} s, "
             + (f"over 2 draws {result['ct_volume_seconds_n_noise_2_draws']:.1f} s, "
                if result.get("ct_volume_seconds_n_noise_2_draws") is not None else "") +
             f"softmax uncertainty (one draw) {result['ct_volume_seconds_softmax_uncertainty']:.1f} s. "
             + (f"On the paper's tapping (backbone widths {fast['paper_taps_model']['widths']}, up-blocks "
                f"{fast['paper_taps_model']['feature_blocks']}: the forward stops at 1/2 resolution, "
                f"{fast['paper_taps_model']['model_forward_flops_per_image'] / 1e9:.0f} GFLOP per image against "
                f"{result['inference']['flops']['model_forward_per_image'] / 1e9:.0f}), std over 2 draws "
                f"{result['ct_volume_seconds_with_uncertainty_paper_taps']:.1f} s (measured on "
                f"{fast['volume']['paper_taps_draws_n_noise_2']['measured_depth']} slices, scaled), floor "
                f"{result['ct_volume_floor_s_per_draw_paper_taps']:.1f} s per draw. "
                if fast.get("paper_taps_model") else "") +
             f"2D 256 px: n_noise 1 {f2d['n_noise_1']['min_s']:.3f} s, n_noise 4 "
             f"{f2d['n_noise_4_draws']['min_s']:.3f} s, "
             f"softmax uncertainty {f2d['softmax_uncertainty']['min_s']:.3f} s. Floor at {fast['threads']} thread(s): "
             f"{result['floor_fast']['rate_gflops']:.0f} GFLOP/s -> {result['floor_fast']['floor_s']:.3f} s per 2D "
             f"forward, {result['ct_volume_floor_s_per_draw']:.1f} s per draw of the volume's "
             f"{fast['volume_shape'][0]} slices. "
             f"Native reduced precision on this device: {fast['native_low_precision']}; the 3x3 convolution under "
             "bf16 "
             f"autocast runs at {result['conv_bf16']['gflops_best']:.2f} GFLOP/s vs "
             f"{result['conv_bf16']['fp32_same_shape_gflops_best']:.0f} in fp32 (same "
             "shape), " + _precision_clause(fast), "",
             f"### Ablation (slab {fast['ablation_slab']}, n_noise {fast['ablation_n_noise']}, best of the repeats)",
             "",
             common.markdown_table(["configuration", "threads", "seconds", "s/slice", "x reference"],
                                   [[r["configuration"], r["threads"], r["min_s"], r["seconds_per_slice"],
                                     r["speedup_vs_reference"]] for r in fast["ablation"]],
                                   ["---", "---:", "---:", "---:", "---:"]), "", f"Note: {fast['note']}.", ""]
    fb = result.get("floor_breakdown")
    if fb:
        lines += ["### Where the 2D forward's time goes (one thread, channels_last, convolutions timed by hooks)", "",
                  common.markdown_table(["part", "seconds", "GFLOP", "GFLOP/s"],
                                        [[k, v["seconds"], v["gflop"], v["gflops_per_s"]] for k,
                                         v in fb["by_kind"].items()]
                                        + [["everything else (norms, activations, attention, resampling, copies)",
                                            fb["other_s"], None, None],
                                            ["whole forward", fb["forward_s"], None, None]],
                                        ["---", "---:", "---:", "---:"]), "",
                  f"Convolutions at the best measured rate ({fb['rate_gflops']:.0f} GFLOP/s) would take "
                  f"{fb['conv_floor_s']:.3f} s; with the rest as it runs now the forward would be "
                  f"{fb['best_case_over_floor']:.2f}x that floor. CPU: {result.get('cpu_isa')}"
                  + (" (no AVX-512, so no native BF16 or VNNI)" if "avx512" not in str(result.get("cpu_isa")) else "")
                  + (f". The best 3x3 rate is above the large-matmul rate ({result['matmul']['gflops_best']:.0f} "
                     "GFLOP/s, about the direct-FMA peak): oneDNN runs such convolutions with fewer multiplies than "
                     "the FLOP count assumes (Winograd-style), which the other ops cannot."
                     if fb["rate_gflops"] > result["matmul"]["gflops_best"] else "."), ""]
    tr = result.get("truncation")
    if tr:
        lines += ["### The truncated backbone forward (features() stops after the last tapped up-block)", "",
                  common.markdown_table(["taps", "features() GFLOP", "whole U-Net GFLOP", "saved"],
                                        [[str(tr[k]["feature_blocks"]), tr[k]["features_gflop"],
                                          tr[k]["full_unet_gflop"],
                                          f"{100 * tr[k]['saved_fraction']:.0f} %"] for k in ("paper_taps",
                                                                                              "all_blocks")],
                                        ["---", "---:", "---:", "---:"]),
                  "", f"Backbone widths {tr['widths']}, three timesteps, one image.", ""]
    dc = result.get("dice_check")
    if dc:
        lines += ["### Dice with and without the optimisations, uncertainty ranking", "",
                  f"{dc['dataset']}, {dc['split']} split ({dc['n_test']} images), model trained on "
                  f"{int(dc['labeled_fraction'] * 100)} % labels:", "",
                  common.markdown_table(["inference", "test Dice", "seconds"],
                                        [[k, v, dc["seconds"][k]] for k, v in dc["dice"].items()],
                                        ["---", "---:", "---:"]),
                  "",
                  "Spearman rank correlation of the per-image mean uncertainty with the reference n_noise 4 ranking: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in dc["uncertainty_spearman_vs_reference_n4"].items()) + ".", ""]
    return lines


def gpu_rows() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"measured": False, "reason": "no CUDA device on this machine", "rows": [
            {"device": "cuda", "measurement": m, "value": "not measured"}
            for m in ("train_speedup_vs_textdiff_style", "infer_speedup_vs_iterative", "ours_2d_latency_s",
                      "volume_latency_s")]}
    return {"measured": False, "reason": f"CUDA present ({torch.cuda.get_device_name(0)}): rerun with --device cuda"}


def text_encoder_summary() -> dict | None:
    path = common.RESULTS / "text_speed.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rows = [r for r in data.get("rows", []) if r.get("device") == "cpu" and "tokens_per_s" in r
            and isinstance(r["tokens_per_s"], (int, float))]
    return {"source": str(path.relative_to(common.ROOT)), "command": data.get("command"),
            "rows": [{k: r.get(k) for k in ("model", "workload", "mode", "tokens_per_s")} for r in rows]}


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    m = result["machine"]
    inf = result["inference"]
    lines = ["# Speed: FastTextDiff vs reference-style pipelines", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {m['cpu']}, {m['torch_threads']} torch thread(s), load average at start {m['loadavg_start']}, "
             f"at end {result['loadavg_end']}; measured fp32 rates: matmul {result['matmul']['gflops_best']:.1f} "
             "GFLOP/s "
             f"({result['matmul']['n']}^3, MKL), 3x3 convolution {result['conv']['gflops_best']:.1f} GFLOP/s "
             "(oneDNN); "
             f"floors use the higher.  ",
             "A shared machine: absolute seconds move with the load; the ratios come from one run.", "",
             "## Headline", "",
             common.markdown_table(["figure", "value"], [
                 ["train_speedup_vs_textdiff_style (64 px, accuracy-benchmark config)",
                  result["train_speedup_vs_textdiff_style"]],
                 ["train speedup at 256 px (all four up-blocks tapped, two at 256 px)",
                  result["training"].get("256px", {}).get("speedup")],
                 ["train speedup at 256 px, taps up to 128 px (the paper's)",
                  result["training"].get("256px_taps_to_128", {}).get("speedup")],
                 ["infer_speedup_vs_iterative (2D 256 px, vs 1000 steps)", result["infer_speedup_vs_iterative"]],
                 ["infer speedup vs 1000 steps, from medians", inf["speedup_vs_1000_steps_median"]],
                 ["infer speedup vs 50 DDIM steps (measured)", inf["speedup_vs_ddim_50"]],
                 ["3D volume speedup vs 1000 steps", inf["volume"]["speedup_vs_1000_steps"]],
                 ["ours 2D latency / physical floor (best measured rate)", result["floor"]["ours_2d_over_floor"]],
                 ["ours 2D latency / matmul-rate floor", result["floor"]["ours_2d_over_matmul_floor"]],
             ], ["---", "---:"]), "", "## Training throughput (images/s)", ""]
    rows = []
    for name, t in result["training"].items():
        rows.append([name, "ours (batch 8, cached text + features)", t["ours"]["images"], t["ours"]["seconds"],
                     t["ours"]["images_per_s"], t["ours"]["seconds_per_epoch"], 1.0])
        for label, ref in t["textdiff_style"].items():
            rows.append([name, f"TextDiff-style (batch 1, re-encode text: {label})", ref["images"], ref["seconds"],
                         ref["images_per_s"], ref["seconds_per_epoch"],
                         t["ours"]["images_per_s"] / ref["images_per_s"]])
    lines.append(common.markdown_table(["config", "loop", "images", "seconds", "images/s", "s/epoch",
                                        "ours is x faster"],
                                       rows, ["---", "---", "---:", "---:", "---:", "---:", "---:"]))
    lines += ["", "Ours / TextDiff-style (full report) per round, each pair run back to back: " + "; ".join(
        f"{name}: " + ", ".join(f"{x:.2f}" for x in t.get("speedup_per_round", [])) for name,
        t in result["training"].items())
        + ". Headline = best throughput of each loop over the rounds."]
    fl = inf["flops"]
    rate = result["floor"]["rate_gflops"] * 1e9
    lines += ["",
              f"## Inference latency ({inf['config']['size']} px model, widths "
              + "/".join(map(str, inf["config"]["widths"])) + ")", "",
              common.markdown_table(["pipeline", "seconds (best)", "median", "FLOPs", "floor s", "x floor"], [
                  ["ours 2D, n_noise=1 (3 timesteps, one batched pass)", inf["ours_2d_n_noise_1"]["min_s"],
                   inf["ours_2d_n_noise_1"]["median_s"], float(fl["model_forward_per_image"]),
                   fl["model_forward_per_image"] / rate,
                   inf["ours_2d_n_noise_1"]["min_s"] / (fl["model_forward_per_image"] / rate)],
                  ["ours 2D, n_noise=4 (with uncertainty)", inf["ours_2d_n_noise_4"]["min_s"],
                   inf["ours_2d_n_noise_4"]["median_s"],
                   float(4 * fl["model_forward_per_image"]), 4 * fl["model_forward_per_image"] / rate, None],
                  ["iterative sampler, one step (timed interleaved with ours)",
                   inf["iterative_step_interleaved"]["min_s"],
                   inf["iterative_step_interleaved"]["median_s"], float(fl["iterative_step_per_image"]),
                   fl["iterative_step_per_image"] / rate,
                   inf["iterative_step_interleaved"]["min_s"] / (fl["iterative_step_per_image"] / rate)],
                  ["iterative sampler, 50 DDIM steps (measured)", inf["iterative_ddim_50"]["min_s"],
                   inf["iterative_ddim_50"]["median_s"], float(50 * fl["iterative_step_per_image"]),
                   50 * fl["iterative_step_per_image"] / rate,
                   inf["iterative_ddim_50"]["min_s"] / (50 * fl["iterative_step_per_image"] / rate)],
                  ["MedSegDiff-style, 1000 steps (per-step cost x 1000)",
                   inf["medsegdiff_1000_steps_s (extrapolated)"], None,
                   float(fl["medsegdiff_1000_steps_per_image"]), fl["medsegdiff_1000_steps_per_image"] / rate, None],
                  [f"ours 3D {inf['volume']['shape']} (n_noise=1)", inf["volume"]["ours_n_noise_1"]["min_s"],
                   inf["volume"]["ours_n_noise_1"]["median_s"], None, None, None],
                  ["iterative 3D, 1000 steps (batches of 16 slices, extrapolated)",
                   inf["volume"]["iterative_1000_steps_s (extrapolated)"], None, None, None, None],
              ], ["---", "---:", "---:", "---:", "---:", "---:"]),
              "", f"Backbone features alone: {fl['backbone_features_per_image'] / 1e9:.2f} GFLOP per image "
                  f"(three timesteps); one sampler step: {fl['iterative_step_per_image'] / 1e9:.2f} GFLOP.", ""]
    if "goals" in result:
        lines += fast_markdown(result)
    lines += ["## GPU", "",
              f"{result['gpu']['reason']}: GPU rows not measured." if not result["gpu"]["measured"] else "", ""]
    te = result.get("text_encoder")
    if te:
        lines += ["## Text encoder (from bench/text_speed.py)", "", f"Source: `{te['source']}` (`{te['command']}`).",
                  "",
                  common.markdown_table(["model", "workload", "mode", "tokens/s"],
                                        [[r["model"], r["workload"], r["mode"],
                                          r["tokens_per_s"]] for r in te["rows"]],
                                        ["---", "---", "---", "---:"]), ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inf = result["inference"]
    volume = (result.get("fast") or {}).get("volume")
    fig, axes = plt.subplots(1, 3 if volume else 2, figsize=(17 if volume else 12, 4.5))
    names = ["ours n=1", "ours n=4", "DDIM 50", "MedSegDiff 1000\n(extrapolated)", "floor\n(ours)"]
    vals = [inf["ours_2d_n_noise_1"]["min_s"], inf["ours_2d_n_noise_4"]["min_s"], inf["iterative_ddim_50"]["min_s"],
            inf["medsegdiff_1000_steps_s (extrapolated)"], result["floor"]["ours_2d_floor_s"]]
    axes[0].bar(names, vals, color=["C0", "C0", "C1", "C1", "C7"])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("seconds per 256x256 image (log)")
    axes[0].set_title("Inference latency")
    labels, ips = [], []
    for name, t in result["training"].items():
        short = name.replace("_taps_to_128", "\npaper taps")
        labels += [f"ours\n{short}", f"TextDiff-\nstyle\n{short}"]
        ips += [t["ours"]["images_per_s"], t["textdiff_style"]["full_report"]["images_per_s"]]
    axes[1].bar(labels, ips, color=["C0", "C1"] * len(result["training"]))
    axes[1].set_yscale("log")
    axes[1].set_ylabel("training images/s (log)")
    axes[1].set_title("Training throughput")
    if volume:
        rows = [("4 draws", "draws_n_noise_4", "C0"), ("2 draws", "draws_n_noise_2", "C0"),
                ("softmax,\n1 draw", "softmax_one_draw", "C0"),
                ("2 draws,\npaper taps", "paper_taps_draws_n_noise_2", "C2")]
        rows = [r for r in rows if r[1] in volume]
        axes[2].bar([r[0] for r in rows], [volume[r[1]]["min_s"] for r in rows], color=[r[2] for r in rows])
        axes[2].axhline(GOALS["ct_volume_seconds_with_uncertainty"], color="C3", linestyle="--", label="goal (30 s)")
        axes[2].set_ylabel("seconds, 48x512x512 CT with uncertainty")
        axes[2].set_title(f"Volume, fast path ({result['fast']['threads']} threads)")
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"FastTextDiff speed on {result['machine']['cpu']} ({result['machine']['torch_threads']} thread(s))")
    common.savefig(fig, path)
    plt.close(fig)


NOTES = [
    "Equal model size: both training loops train the same fusion + head on the same frozen backbone with the "
    "same text encoder; the reference loop is timed inside the loop only (no model loading), ours end to end.",
    "The TextDiff-style loop is given MONAI rot90/flip/rotate augmentation as the reference applies; "
    "'10_tokens' truncates reports to 10 tokens as the reference code does (less text work, less information).",
    "The iterative sampler is a diffusers UNet2DModel with the backbone's architecture (mask + image channels in) "
    "and diffusers' DDIMScheduler; its weights are random because step cost does not depend on them. "
    "MedSegDiff samples 1000 steps (and often ensembles several samples, not counted here).",
    "Floor = FLOPs (torch.utils.flop_counter.FlopCounterMode) / the best measured fp32 rate. On this AMD CPU "
    "MKL's sgemm reaches about half of what oneDNN's convolutions do, so both rates are recorded and the floor "
    "uses the higher; against the matmul rate alone the U-Net would appear to beat its floor.",
]


def run_fast_path_only(args, result: dict, conv_start: dict, matmul_start: dict) -> dict:
    """The fast-inference-path rows alone (a shorter run for a busy machine); the full run reports them too."""
    from fasttextdiff.inference.pipeline import Segmenter

    started = time.perf_counter()
    result["conv"], result["matmul"] = conv_start, matmul_start
    tiny = args.tiny
    with tempfile.TemporaryDirectory(prefix="bench-speed-fast-") as tmp:
        work = Path(tmp)
        size, widths, vshape = (32, (8, 16), (4, 48, 48)) if tiny else (256, INFER_WIDTHS, (48, 512, 512))
        partial = args.out / "speed.partial.json"
        result["training"] = {}
        if not args.skip_256_train:  # busy-machine order: the goal rows first, each saved when done
            name = "64px" if tiny else "256px_taps_to_128"
            result["training"][name] = train_comparison(name, (TINY_TRAIN if tiny else QUICK_TRAIN)[name], work,
                                                        args.device, rounds=1)
            print(f"[speed] training {name}: {result['training'][name]['speedup']:.2f}x", flush=True)
            common.write_json(partial, result)
        if not args.skip_dice and not tiny:
            result["dice_check"] = dice_check(work, args.device, args.infer_threads)
            print(f"[speed] dice check: {result['dice_check']['dice']}", flush=True)
            common.write_json(partial, result)
        result["fast"] = fast_inference_section(work, args.quick, args.device, args.infer_threads, size=size,
                                                widths=widths, volume_shape=vshape,
                                                mini_depth=2 if tiny else args.slab,
                                                measured_depth=args.volume_depth, repeats=1 if args.quick else None,
                                                paper_taps=TINY_PAPER_TAPS if tiny else PAPER_TAPS_MODEL)
        common.write_json(partial, result)
        result["fast_2d"] = fast_2d_latency(work, args.device, args.infer_threads, size=size, repeats=1 if tiny else 2)
        result["conv_fast_threads"] = conv_rate(repeats=10)
        seg = Segmenter.load(work / "model_infer", device=args.device)
        result["inference"] = {"flops": {"model_forward_per_image": forward_flops(seg, size)}}
        hardware_rows(result, work / "model_infer", args.device, size, result["conv"]["gflops_best"], tiny)
        common.set_threads(args.threads)
    t = result["training"]
    result["train_speedup_vs_textdiff_style_256px"] = t.get("256px_taps_to_128", {}).get("speedup")
    result["train_speedup_vs_textdiff_style_64px"] = t.get("64px", {}).get("speedup")
    headline_fast(result)
    result["gpu"] = gpu_rows()
    result["loadavg_end"] = common.loadavg()
    result["seconds"] = round(time.perf_counter() - started, 1)
    lines = ["# Speed, fast inference path rows (and 256 px paper-taps training)", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']['cpu']}, load average at start {result['machine']['loadavg_start']}, at "
             "end "
             f"{result['loadavg_end']}; {result['seconds']:.0f} s wall. A shared machine: absolute seconds move with "
             "the load; ratios come from one run.", ""]
    lines += fast_markdown(result)
    for name, tr in t.items():
        lines += [f"### Training {name} (one round)", "",
                  common.markdown_table(["loop", "images", "seconds", "images/s", "ours is x faster"],
                                        [["ours", tr["ours"]["images"], tr["ours"]["seconds"],
                                          tr["ours"]["images_per_s"], 1.0]]
                                        + [[f"TextDiff-style ({k})", r["images"], r["seconds"], r["images_per_s"],
                                            tr["ours"]["images_per_s"] / r["images_per_s"]]
                                           for k, r in tr["textdiff_style"].items()],
                                        ["---", "---:", "---:", "---:", "---:"]), ""]
    lines += ["## GPU", "", f"{result['gpu']['reason']}: GPU rows not measured.", ""]
    common.write_json(args.out / "speed_fast_path.json", result)
    common.write_text(args.out / "speed_fast_path.md", "\n".join(lines) + "\n")
    (args.out / "speed.partial.json").unlink(missing_ok=True)
    print("\n".join(lines))
    return result


def in_run_order(result: dict) -> dict:
    """A reloaded result's tables back in the order the run wrote them (the JSON is saved with sorted keys)."""
    order = list(TRAIN_CONFIGS)
    result["training"] = dict(sorted(result["training"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order
                                     else len(order)))
    for tr in result["training"].values():
        tr["textdiff_style"] = dict(sorted(tr["textdiff_style"].items(), key=lambda kv: kv[0] != "full_report"))
    dc = result.get("dice_check")
    if dc:
        rows = ("reference_n1", "fast_n1", "reference_n4", "fast_n4", "fast_n2", "fast_softmax",
                "reference_n4_other_draws")
        for key in ("dice", "seconds", "uncertainty_spearman_vs_reference_n4"):
            dc[key] = dict(sorted(dc[key].items(), key=lambda kv: rows.index(kv[0]) if kv[0] in rows else len(rows)))
    fb = result.get("floor_breakdown")
    if fb:
        fb["by_kind"] = dict(sorted(fb["by_kind"].items(), key=lambda kv: -kv[1]["gflop"]))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Speed benchmark: training and inference against the reference pipelines.")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1; on a shared 2-core machine 2 threads were measured erratic)")
    p.add_argument("--infer-threads", type=int, default=2,
                   help="torch threads for the fast-path rows (volume, 2D latency, Dice check); default 2 = both "
                        "cores")
    p.add_argument("--skip-dice", action="store_true", help="skip the Dice / uncertainty-ranking check")
    p.add_argument("--device", default=None)
    p.add_argument("--skip-256-train", action="store_true", help="only the 64 px training comparison")
    p.add_argument("--tiny", action="store_true", help="smallest configuration (the smoke test): meaningless numbers")
    p.add_argument("--only-fast-path", action="store_true",
                   help="only the fast-path rows (ablation, volume, 2D, Dice/ranking, truncation) and the 256 px "
                        "paper-taps training comparison (one round); writes speed_fast_path.{json,md}")
    p.add_argument("--volume-depth", type=int, default=None,
                   help="measure the volume on this many slices and scale to 48 "
                        "(only with --only-fast-path; busy machines)")
    p.add_argument("--slab", type=int, default=4, help="slices in the ablation slab (the first is air)")
    p.add_argument("--only-dice-check", action="store_true",
                   help="only the Dice / uncertainty-ranking check (-> --out/speed_dice_check.json)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only recompute the derived figures and rewrite speed.md/.png next to a speed.json (no "
                        "timing)")
    args = p.parse_args(argv)
    if args.render:
        result = in_run_order(json.loads(args.render.read_text(encoding="utf-8")))
        headline_fast(result)
        common.write_json(args.render, result)
        common.write_text(args.render.with_suffix(".md"), markdown(result))
        plot(result, args.render.with_suffix(".png"))
        return result
    common.set_threads(args.threads)
    command = "python bench/speed.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "quick": args.quick, "machine": common.machine_info(args.device), "notes": NOTES}
    result["matmul"] = None
    # machine rates: best of 20 calls (10 quick); the --tiny smoke test only checks they are measured
    rate_repeats = 2 if args.tiny else 10 if args.quick else 20
    matmul_start = matmul_rate(repeats=rate_repeats)
    conv_start = conv_rate(repeats=rate_repeats)
    specs = TINY_TRAIN if args.tiny else QUICK_TRAIN if args.quick else TRAIN_CONFIGS
    if args.only_fast_path:
        return run_fast_path_only(args, result, conv_start, matmul_start)
    if args.only_dice_check:
        with tempfile.TemporaryDirectory(prefix="bench-speed-dice-") as tmp:
            result["dice_check"] = dice_check(Path(tmp), args.device, args.infer_threads)
        result["seconds"] = round(time.perf_counter() - started, 1)
        common.write_json(args.out / "speed_dice_check.json", result)
        print(json.dumps(result["dice_check"], indent=2))
        return result
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        work = Path(tmp)
        result["training"] = {}
        for name, spec in specs.items():
            if name.startswith("256px") and args.skip_256_train:
                continue
            result["training"][name] = train_comparison(name, spec, work, args.device,
                                                         rounds=1 if args.tiny else 2 if args.quick else 3)
            print(f"[speed] training {name}: ours {result['training'][name]['speedup']:.2f}x the TextDiff-style loop",
                  flush=True)
            common.write_json(args.out / "speed.partial.json",
                              result)  # a long run on a shared machine: keep what is done
        if args.tiny:
            result["inference"] = inference_comparison(work, True, args.device, size=32, widths=(8, 16),
                                                       volume_shape=(4, 48, 48))
            result["fast"] = fast_inference_section(work, True, args.device, args.infer_threads, size=32,
                                                    widths=(8, 16),
                                                    volume_shape=(4, 48, 48), mini_depth=2, paper_taps=TINY_PAPER_TAPS)
            result["fast_2d"] = fast_2d_latency(work, args.device, args.infer_threads, size=32, repeats=1)
        else:
            result["inference"] = inference_comparison(work, args.quick, args.device)
            result["fast"] = fast_inference_section(work, args.quick, args.device, args.infer_threads)
            result["fast_2d"] = fast_2d_latency(work, args.device, args.infer_threads, repeats=4 if args.quick else 10)
        common.write_json(args.out / "speed.partial.json", result)
        conv_fast = conv_rate(repeats=rate_repeats)  # at --infer-threads (set by the sections above)
        hardware_rows(result, work / "model_infer", args.device, 32 if args.tiny else 256, conv_start["gflops_best"],
                      args.tiny)
        if not args.skip_dice and not args.tiny:
            result["dice_check"] = dice_check(work, args.device, args.infer_threads)
        common.set_threads(args.threads)
    matmul_end = matmul_rate(repeats=rate_repeats)
    # the machine's rate is the best it showed (other jobs only ever slow it down)
    result["matmul"] = max(matmul_start, matmul_end, key=lambda m: m["gflops_best"])
    result["matmul_runs"] = {"start": matmul_start, "end": matmul_end}
    conv_end = conv_rate(repeats=rate_repeats)
    result["conv"] = max(conv_start, conv_end, key=lambda m: m["gflops_best"])
    inf = result["inference"]
    # the floor uses the best rate the machine showed, matmul or convolution (see conv_rate)
    rate = max(result["matmul"]["gflops_best"], result["conv"]["gflops_best"]) * 1e9
    floor = inf["flops"]["model_forward_per_image"] / rate
    matmul_floor = inf["flops"]["model_forward_per_image"] / (result["matmul"]["gflops_best"] * 1e9)
    result["floor"] = {"rate_gflops": rate / 1e9, "ours_2d_floor_s": floor,
                       "ours_2d_over_floor": inf["ours_2d_n_noise_1"]["min_s"] / floor,
                       "ours_2d_matmul_floor_s": matmul_floor,
                       "ours_2d_over_matmul_floor": inf["ours_2d_n_noise_1"]["min_s"] / matmul_floor,
                       "medsegdiff_1000_floor_s": inf["flops"]["medsegdiff_1000_steps_per_image"] / rate}
    result["train_speedup_vs_textdiff_style"] = result["training"]["64px"]["speedup"]  # the accuracy-benchmark config
    result["train_speedup_vs_textdiff_style_64px"] = result["training"]["64px"]["speedup"]
    paper_taps = result["training"].get("256px_taps_to_128")
    result["train_speedup_vs_textdiff_style_256px"] = paper_taps["speedup"] if paper_taps else None
    result["train_speedup_vs_textdiff_style_256px_all_taps"] = result["training"].get("256px", {}).get("speedup")
    result["conv_fast_threads"] = conv_fast
    headline_fast(result)
    result["infer_speedup_vs_iterative"] = inf["speedup_vs_1000_steps"]
    result["gpu"] = gpu_rows()
    result["text_encoder"] = text_encoder_summary()
    result["loadavg_end"] = common.loadavg()
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "speed.json", result)
    (args.out / "speed.partial.json").unlink(missing_ok=True)
    common.write_text(args.out / "speed.md", markdown(result))
    plot(result, args.out / "speed.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

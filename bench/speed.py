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
    return {"n": n, "gflops_best": 2 * n**3 / timing["min_s"] / 1e9, "gflops_median": 2 * n**3 / timing["median_s"] / 1e9,
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


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def train_comparison(name: str, spec, work: Path, device, rounds: int = 1) -> dict:
    import torch

    import baselines
    from fasttextdiff.backbone import DiffusionBackbone
    from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.data.synthetic import make_lvit_dataset
    from fasttextdiff.devices import resolve_device
    from fasttextdiff.model import FastTextDiffModel
    from fasttextdiff.workflows import load_lvit
    from fasttextdiff.text import TextEncoder
    from fasttextdiff.train import train_segmenter

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
        ref = baselines.textdiff_style_train(fresh, samples, encoder, n_images=ref_images, max_tokens=max_tokens, seed=r)
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


def build_inference_model(work: Path, device, size: int = 256, widths=INFER_WIDTHS) -> Path:
    """A 256 px FastTextDiff model directory through the public path (random backbone: speed only)."""
    from fasttextdiff.backbone import DiffusionBackbone
    from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.data.synthetic import make_lvit_dataset
    from fasttextdiff.workflows import load_lvit
    from fasttextdiff.train import train_segmenter

    root = make_lvit_dataset(work / "data_infer", variant="standard", n_train=2, n_val=0, n_test=0, size=max(32, size), seed=0)
    DiffusionBackbone(BackboneConfig(image_size=size, block_out_channels=tuple(widths))).save_pretrained(work / "bb_infer")
    train_segmenter(load_lvit(root)["train"], work / "model_infer", backbone_dir=work / "bb_infer",
                    text_config=TextConfig(encoder="tiny"), segmenter_config=SegmenterConfig(fusion=FusionConfig(dim=64)),
                    train_config=TrainConfig(epochs=1, batch_size=2), device=device, progress=False)
    return work / "model_infer"


def inference_comparison(work: Path, quick: bool, device, size: int = 256, widths=INFER_WIDTHS,
                         volume_shape=(48, 512, 512)) -> dict:
    import torch

    import baselines
    from fasttextdiff.data.io import Image
    from fasttextdiff.data.preprocess import to_model_input
    from fasttextdiff.infer import Segmenter

    model_dir = build_inference_model(work, device, size, widths)
    seg = Segmenter.load(model_dir, device=device, n_noise=1, batch_size=16)
    rng = np.random.default_rng(0)
    image2d = Image(rng.integers(0, 255, (size, size), dtype=np.uint8), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False)
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
        ours_times.append(common.time_calls(lambda: seg.segment(image2d, report(), n_noise=1), repeats=1, warmup=0)["min_s"])
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
             f"at end {result['loadavg_end']}; measured fp32 rates: matmul {result['matmul']['gflops_best']:.1f} GFLOP/s "
             f"({result['matmul']['n']}^3, MKL), 3x3 convolution {result['conv']['gflops_best']:.1f} GFLOP/s (oneDNN); "
             f"floors use the higher.  ",
             "A shared machine: absolute seconds move with the load; the ratios come from one run.", "",
             "## Headline", "",
             common.markdown_table(["figure", "value"], [
                 ["train_speedup_vs_textdiff_style (64 px, accuracy-benchmark config)", result["train_speedup_vs_textdiff_style"]],
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
                         ref["images_per_s"], ref["seconds_per_epoch"], t["ours"]["images_per_s"] / ref["images_per_s"]])
    lines.append(common.markdown_table(["config", "loop", "images", "seconds", "images/s", "s/epoch", "ours is x faster"],
                                       rows, ["---", "---", "---:", "---:", "---:", "---:", "---:"]))
    lines += ["", "Ours / TextDiff-style (full report) per round, each pair run back to back: " + "; ".join(
        f"{name}: " + ", ".join(f"{x:.2f}" for x in t.get("speedup_per_round", [])) for name, t in result["training"].items())
        + ". Headline = best throughput of each loop over the rounds."]
    fl = inf["flops"]
    rate = result["floor"]["rate_gflops"] * 1e9
    lines += ["", f"## Inference latency ({inf['config']['size']} px model, widths " + "/".join(map(str, inf["config"]["widths"])) + ")", "",
              common.markdown_table(["pipeline", "seconds (best)", "median", "FLOPs", "floor s", "x floor"], [
                  ["ours 2D, n_noise=1 (3 timesteps, one batched pass)", inf["ours_2d_n_noise_1"]["min_s"],
                   inf["ours_2d_n_noise_1"]["median_s"], float(fl["model_forward_per_image"]),
                   fl["model_forward_per_image"] / rate, inf["ours_2d_n_noise_1"]["min_s"] / (fl["model_forward_per_image"] / rate)],
                  ["ours 2D, n_noise=4 (with uncertainty)", inf["ours_2d_n_noise_4"]["min_s"], inf["ours_2d_n_noise_4"]["median_s"],
                   float(4 * fl["model_forward_per_image"]), 4 * fl["model_forward_per_image"] / rate, None],
                  ["iterative sampler, one step (timed interleaved with ours)", inf["iterative_step_interleaved"]["min_s"],
                   inf["iterative_step_interleaved"]["median_s"], float(fl["iterative_step_per_image"]),
                   fl["iterative_step_per_image"] / rate,
                   inf["iterative_step_interleaved"]["min_s"] / (fl["iterative_step_per_image"] / rate)],
                  ["iterative sampler, 50 DDIM steps (measured)", inf["iterative_ddim_50"]["min_s"],
                   inf["iterative_ddim_50"]["median_s"], float(50 * fl["iterative_step_per_image"]),
                   50 * fl["iterative_step_per_image"] / rate, inf["iterative_ddim_50"]["min_s"] / (50 * fl["iterative_step_per_image"] / rate)],
                  ["MedSegDiff-style, 1000 steps (per-step cost x 1000)", inf["medsegdiff_1000_steps_s (extrapolated)"], None,
                   float(fl["medsegdiff_1000_steps_per_image"]), fl["medsegdiff_1000_steps_per_image"] / rate, None],
                  [f"ours 3D {inf['volume']['shape']} (n_noise=1)", inf["volume"]["ours_n_noise_1"]["min_s"],
                   inf["volume"]["ours_n_noise_1"]["median_s"], None, None, None],
                  ["iterative 3D, 1000 steps (batches of 16 slices, extrapolated)",
                   inf["volume"]["iterative_1000_steps_s (extrapolated)"], None, None, None, None],
              ], ["---", "---:", "---:", "---:", "---:", "---:"]),
              "", f"Backbone features alone: {fl['backbone_features_per_image'] / 1e9:.2f} GFLOP per image "
                  f"(three timesteps); one sampler step: {fl['iterative_step_per_image'] / 1e9:.2f} GFLOP.", ""]
    lines += ["## GPU", "", f"{result['gpu']['reason']}: GPU rows not measured." if not result["gpu"]["measured"] else "", ""]
    te = result.get("text_encoder")
    if te:
        lines += ["## Text encoder (from bench/text_speed.py)", "", f"Source: `{te['source']}` (`{te['command']}`).", "",
                  common.markdown_table(["model", "workload", "mode", "tokens/s"],
                                        [[r["model"], r["workload"], r["mode"], r["tokens_per_s"]] for r in te["rows"]],
                                        ["---", "---", "---", "---:"]), ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inf = result["inference"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = ["ours n=1", "ours n=4", "DDIM 50", "MedSegDiff 1000\n(extrapolated)", "floor (ours)"]
    vals = [inf["ours_2d_n_noise_1"]["min_s"], inf["ours_2d_n_noise_4"]["min_s"], inf["iterative_ddim_50"]["min_s"],
            inf["medsegdiff_1000_steps_s (extrapolated)"], result["floor"]["ours_2d_floor_s"]]
    axes[0].bar(names, vals, color=["C0", "C0", "C1", "C1", "C7"])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("seconds per 256x256 image (log)")
    axes[0].set_title("Inference latency")
    labels, ips = [], []
    for name, t in result["training"].items():
        labels += [f"ours {name}", f"TextDiff-style {name}"]
        ips += [t["ours"]["images_per_s"], t["textdiff_style"]["full_report"]["images_per_s"]]
    axes[1].bar(labels, ips, color=["C0", "C1"] * len(result["training"]))
    axes[1].set_yscale("log")
    axes[1].set_ylabel("training images/s (log)")
    axes[1].set_title("Training throughput")
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Speed benchmark (issue 4).")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1; on a shared 2-core machine 2 threads were measured erratic)")
    p.add_argument("--device", default=None)
    p.add_argument("--skip-256-train", action="store_true", help="only the 64 px training comparison")
    p.add_argument("--tiny", action="store_true", help="smallest configuration (the smoke test): meaningless numbers")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    command = "python bench/speed.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    result = {"command": command, "quick": args.quick, "machine": common.machine_info(), "notes": NOTES}
    result["matmul"] = None
    matmul_start = matmul_rate(repeats=10 if args.quick else 20)
    conv_start = conv_rate(repeats=10 if args.quick else 20)
    specs = TINY_TRAIN if args.tiny else QUICK_TRAIN if args.quick else TRAIN_CONFIGS
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
        if args.tiny:
            result["inference"] = inference_comparison(work, True, args.device, size=32, widths=(8, 16),
                                                       volume_shape=(4, 48, 48))
        else:
            result["inference"] = inference_comparison(work, args.quick, args.device)
    matmul_end = matmul_rate(repeats=10 if args.quick else 20)
    # the machine's rate is the best it showed (other jobs only ever slow it down)
    result["matmul"] = max(matmul_start, matmul_end, key=lambda m: m["gflops_best"])
    result["matmul_runs"] = {"start": matmul_start, "end": matmul_end}
    conv_end = conv_rate(repeats=10 if args.quick else 20)
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
    result["infer_speedup_vs_iterative"] = inf["speedup_vs_1000_steps"]
    result["gpu"] = gpu_rows()
    result["text_encoder"] = text_encoder_summary()
    result["loadavg_end"] = common.loadavg()
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "speed.json", result)
    common.write_text(args.out / "speed.md", markdown(result))
    plot(result, args.out / "speed.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

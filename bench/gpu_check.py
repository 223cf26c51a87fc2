"""`make gpu-check`: does FastTextDiff work, and how fast, on this machine's GPU(s)? About 5 minutes on one GPU.

    python bench/gpu_check.py [--json bench/results/gpu_check.json] [--skip server,multi-gpu,...]

Checks, each a row of the printed table and of the JSON (status ok / failed / skipped, seconds, figures):
  train-bf16, train-fp16  fusion + head training steps under CUDA autocast (fp16 with loss scaling): finite losses
  train-engine            `train_segmenter` end to end on a small synthetic set (the engine picks bf16/fp16)
  infer-autocast          a trained model's predictions under bf16 / fp16 against fp32: agreement of the masks
  text-attention          ModernBERT with FlashAttention 2 (unpadded; when flash_attn is installed) against sdpa
  multi-gpu               the same training on 2 GPUs through `accelerate launch` (only with more than one GPU)
  server-volume           a 48x512x512 NIfTI through the MONAI Label server's `fasttextdiff` infer task
  speed-*                 the paper's ADM-256 backbone (random weights, full size): features per image at its
                          taps, a training step of fusion + head, one 256 px image through the segmenter
Without CUDA it says there is nothing to check and exits 0 (`--allow-cpu` runs the checks on the CPU at
tiny sizes, to test this script itself; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import common  # noqa: F401 - lib/ on the path, offline, passive OpenMP
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "bench" / "results" / "gpu_check.json"
REPORT = "Unilateral pulmonary infection, one infected area, upper left lung."
CHECKS = ("train-bf16", "train-fp16", "train-engine", "infer-autocast", "text-attention", "multi-gpu",
          "server-volume", "speed-features", "speed-train-step", "speed-segment")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """Median seconds per call after one warm-up call, synchronised with the GPU."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


class Context:
    """What the checks share: device, sizes, a work folder, the small dataset and the model trained on it."""

    def __init__(self, device: torch.device, work: Path, tiny: bool):
        self.device, self.work, self.tiny = device, work, tiny
        self.size = 32 if tiny else 128
        self.widths = (8, 16) if tiny else (64, 128, 256, 256)
        self.data: Path | None = None
        self.backbone_dir: Path | None = None
        self.model_dir: Path | None = None

    def dataset(self) -> Path:
        if self.data is None:
            from fasttextdiff.data.synthetic import make_lvit_dataset

            self.data = make_lvit_dataset(self.work / "data", variant="text-necessary", n_train=16, n_val=4, n_test=4,
                                          size=self.size, seed=0)
        return self.data

    def backbone(self) -> Path:
        if self.backbone_dir is None:
            from fasttextdiff.models.backbone import DiffusionBackbone
            from fasttextdiff.config import BackboneConfig

            self.backbone_dir = self.work / "backbone"
            DiffusionBackbone(BackboneConfig(image_size=self.size, block_out_channels=self.widths,
                                             attention=not self.tiny)).save_pretrained(self.backbone_dir)
        return self.backbone_dir

    def configs(self, epochs: int = 3) -> dict:
        from fasttextdiff.config import FusionConfig, SegmenterConfig, TextConfig, TrainConfig

        return {"text_config": TextConfig(encoder="tiny"),
                "segmenter_config": SegmenterConfig(head_channels=16,
                                                    fusion=FusionConfig(dim=32 if self.tiny else 64)),
                "train_config": TrainConfig(epochs=epochs, batch_size=8, lr=1e-3)}


# -------------------------------------------------------------------------------------------------- checks


def check_train_autocast(ctx: Context, dtype: torch.dtype) -> dict:
    from fasttextdiff.models.backbone import load_backbone
    from fasttextdiff.models.segmenter import FastTextDiffModel
    from monai.losses import DiceCELoss

    if ctx.device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return {"status": "skipped", "detail": "this GPU has no bf16"}
    torch.manual_seed(0)
    cfg = ctx.configs()
    model = FastTextDiffModel(load_backbone(ctx.backbone()), 64, cfg["segmenter_config"]).to(ctx.device).train()
    images = torch.rand(8, 1, ctx.size, ctx.size, device=ctx.device) * 2 - 1
    labels = (images[:, :1] > 0.3).long()
    text = torch.randn(8, 12, 64, device=ctx.device)
    mask = torch.ones(8, 12, dtype=torch.bool, device=ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16 and ctx.device.type == "cuda")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1.5)
    losses = []

    def step() -> None:
        with torch.autocast(ctx.device.type, dtype=dtype):
            loss = loss_fn(model(images, text, mask).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    seconds = _timed(step, ctx.device, repeats=10)
    ok = all(np.isfinite(losses)) and losses[-1] < losses[0]
    return {"status": "ok" if ok else "failed", "ms_per_step": seconds * 1000, "batch": 8, "size": ctx.size,
            "loss_first": losses[0], "loss_last": losses[-1],
            "detail": "finite, decreasing loss" if ok else f"losses {losses[0]:.3f} -> {losses[-1]:.3f}"}


def check_train_engine(ctx: Context) -> dict:
    from fasttextdiff.training.engine import default_mixed_precision
    from fasttextdiff.training.segmenter import train_segmenter
    from fasttextdiff.training.workflows import load_lvit

    splits = load_lvit(ctx.dataset())
    ctx.model_dir = ctx.work / "model"
    t0 = time.perf_counter()
    metrics = train_segmenter(splits["train"], ctx.model_dir, backbone_dir=ctx.backbone(), val_samples=splits["val"],
                              test_samples=splits["test"], device=str(ctx.device), progress=False, **ctx.configs())
    return {"status": "ok", "seconds": time.perf_counter() - t0, "epochs": metrics["epochs"],
            "mixed_precision": default_mixed_precision(ctx.device), "test_dice": metrics.get("test", {}).get("dice"),
            "feature_cache": metrics["feature_cache"]}


def check_infer_autocast(ctx: Context) -> dict:
    from fasttextdiff.models.segmenter import FastTextDiffModel
    from fasttextdiff.text.encoder import TextEncoder
    from fasttextdiff.config import TextConfig

    if ctx.model_dir is None:
        return {"status": "skipped", "detail": "needs train-engine's model"}
    model, _ = FastTextDiffModel.load(ctx.model_dir, device=ctx.device)
    encoder = TextEncoder(TextConfig(encoder="tiny"), device=ctx.device)
    batch = encoder.encode([REPORT] * 4).to(ctx.device)
    images = torch.rand(4, 1, ctx.size, ctx.size, device=ctx.device) * 2 - 1
    reference = model.predict(images, batch.states, batch.mask)
    out = {"status": "ok"}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ctx.device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            out[name] = "no bf16 on this GPU"
            continue
        with torch.autocast(ctx.device.type, dtype=dtype):
            pred = model.predict(images, batch.states, batch.mask)
            seconds = _timed(lambda: model.predict(images, batch.states, batch.mask), ctx.device)
        agree = float((pred.mask == reference.mask).float().mean())
        diff = float((pred.probabilities.float() - reference.probabilities).abs().max())
        out[name] = {"mask_agreement": agree, "max_probability_difference": diff, "ms_per_batch_of_4": seconds * 1000}
        if agree < 0.99 or not np.isfinite(diff):
            out["status"] = "failed"
    out["fp32_ms_per_batch_of_4"] = _timed(lambda: model.predict(images, batch.states, batch.mask), ctx.device) * 1000
    return out


def check_text_attention(ctx: Context) -> dict:
    from transformers import AutoModel

    from fasttextdiff.text.encoder import build_tiny_encoder, minilm_dir

    if ctx.device.type != "cuda":
        status = {"status": "skipped", "detail": "FlashAttention 2 runs on CUDA only (sdpa timed)"}
    elif importlib.util.find_spec("flash_attn") is None:
        status = {"status": "skipped", "detail": "flash_attn is not installed (pip install -r requirements-gpu.txt)"}
    else:
        status = {"status": "ok"}
    from transformers import AutoTokenizer

    enc_dir = build_tiny_encoder(ctx.work / "mbert", hidden=256, layers=4, heads=4)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    texts = [REPORT * k for k in (1, 3, 7, 15)]  # different lengths: padding matters
    inputs = tok(texts, padding=True, return_tensors="pt").to(ctx.device)
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    results, states = {}, {}
    impls = ["sdpa"] + (["flash_attention_2"] if status["status"] == "ok" else [])
    for impl in impls:
        model = AutoModel.from_pretrained(str(enc_dir), attn_implementation=impl, dtype=dtype,
                                          local_files_only=True).to(ctx.device).eval()
        with torch.inference_mode():
            states[impl] = model(**inputs).last_hidden_state.float()
            results[impl] = {"ms_per_batch": _timed(lambda: model(**inputs), ctx.device) * 1000}
    if "flash_attention_2" in states:
        real = inputs["attention_mask"].bool()
        diff = float((states["flash_attention_2"] - states["sdpa"])[real].abs().max())
        results["max_difference_on_real_tokens"] = diff
        if not diff < 0.1:
            status = {"status": "failed", "detail": f"flash_attention_2 and sdpa differ by {diff:.3g}"}
    return {**status, **results, "tokens": int(inputs["attention_mask"].sum()), "batch": len(texts)}


def check_multi_gpu(ctx: Context) -> dict:
    from fasttextdiff.training.workflows import launch_job, load_lvit

    n = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    if n < 2:
        return {"status": "skipped", "detail": f"{n} GPU(s): multi-process launch needs at least 2"}
    splits = load_lvit(ctx.dataset())
    cfg = ctx.configs()
    spec = {"job": "train-segmenter", "device": "cuda", "out_dir": str(ctx.work / "model-ddp"),
            "backbone_dir": str(ctx.backbone()),
            "samples": [{"image": str(s.image), "mask": str(s.mask), "text": s.text,
                         "name": s.name} for s in splits["train"]],
            "text": cfg["text_config"].to_dict(), "segmenter": cfg["segmenter_config"].to_dict(),
            "train": cfg["train_config"].to_dict()}
    t0 = time.perf_counter()
    metrics = launch_job(spec, num_processes=2, work_dir=ctx.work / "jobs")
    ok = metrics.get("world_size") == 2 and metrics.get("ddp_weights_identical") is True
    return {"status": "ok" if ok else "failed", "seconds": time.perf_counter() - t0,
            "world_size": metrics.get("world_size"),
            "ddp_weights_identical": metrics.get("ddp_weights_identical"), "gpus": n}


def check_server_volume(ctx: Context) -> dict:
    from monailabel.client import MONAILabelClient

    import nibabel as nib

    from fasttextdiff.data.io import read_image
    from load import start_server, stop_server

    if ctx.model_dir is None:
        return {"status": "skipped", "detail": "needs train-engine's model"}
    studies = ctx.work / "studies"
    studies.mkdir(exist_ok=True)
    shape = (48, 512, 512) if not ctx.tiny else (48, 64, 64)
    volume = np.random.default_rng(0).normal(0, 300, shape).astype(np.float32)  # (slices, rows, columns)
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.diag([0.8, 0.8, 5.0, 1.0])), studies / "volume.nii.gz")
    expected = read_image(studies / "volume.nii.gz").array.shape
    t0 = time.perf_counter()
    proc, url = start_server(studies, [("model_dir", str(ctx.model_dir)), ("device", str(ctx.device))],
                             ctx.work / "server.log", timeout=240)
    started = time.perf_counter() - t0
    try:
        client = MONAILabelClient(url)
        t0 = time.perf_counter()
        label_file, info = client.infer("fasttextdiff", "volume", {"text": REPORT, "n_noise": 1})
        seconds = time.perf_counter() - t0
        label = read_image(label_file).array
    finally:
        stop_server(proc)
    ok = tuple(label.shape) == tuple(expected)
    return {"status": "ok" if ok else "failed", "volume": list(shape), "label_shape": list(label.shape),
            "infer_seconds": seconds, "server_start_seconds": started, "n_noise": 1,
            "slices_per_second": shape[0] / seconds}


def _paper_backbone(ctx: Context):
    """ADM-256-uncond at full size (random weights: speed does not depend on them) with the QaTa taps."""
    from diffusers import UNet2DModel

    from fasttextdiff.conversion.adm import ADM_PRESETS, PAPER_TAPS, parse_adm_flags, unet_config
    from fasttextdiff.models.backbone import DiffusionBackbone
    from fasttextdiff.config import BackboneConfig

    text = ADM_PRESETS["adm-256-uncond"] + (" --image_size 32 --channel_mult 1,1,2,2,4,4 --num_channels 32 "
                                            "--num_head_channels 32"
                                          if ctx.tiny else "")
    flags = parse_adm_flags(text)
    with torch.device(ctx.device):
        unet = UNet2DModel(**unet_config(flags))
    config = BackboneConfig(image_size=flags.image_size, in_channels=3, block_out_channels=flags.widths,
                            layers_per_block=flags.num_res_blocks, attention=True, feature_taps=PAPER_TAPS["qata"])
    return DiffusionBackbone(config, unet=unet).freeze()


def check_speed(ctx: Context) -> list[tuple[str, dict]]:
    from fasttextdiff.config import FusionConfig, SegmenterConfig
    from fasttextdiff.models.segmenter import FastTextDiffModel

    backbone = _paper_backbone(ctx)
    size, batch = backbone.config.image_size, 8
    dtype = torch.bfloat16 if ctx.device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    images = torch.rand(batch, 3, size, size, device=ctx.device) * 2 - 1
    with torch.inference_mode(), torch.autocast(ctx.device.type, dtype=dtype):
        seconds = _timed(lambda: backbone.features(images), ctx.device, repeats=3)
    rows = [("speed-features", {"status": "ok", "ms_per_image": seconds / batch * 1000, "batch": batch, "size": size,
                                "taps": list(backbone.config.feature_taps),
                                "timesteps": list(backbone.config.timesteps),
                                "autocast": str(dtype).replace("torch.", "")})]
    model = FastTextDiffModel(backbone, 768, SegmenterConfig(fusion=FusionConfig(dim=256, heads=8))).to(ctx.device)
    with torch.inference_mode():
        features = [f.float() for f in model.pool_features(backbone.features(images))]
    text = torch.randn(batch, 64, 768, device=ctx.device)
    labels = torch.zeros(batch, 1, size, size, dtype=torch.long, device=ctx.device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast(ctx.device.type, dtype=dtype):
            logits = model.forward_features(features, text)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[:, 0])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    rows.append(("speed-train-step", {"status": "ok", "ms_per_image": _timed(step, ctx.device) / batch * 1000,
                                      "batch": batch, "fusion_dim": 256, "text_tokens": 64,
                                      "note": "fusion + head on cached features"}))
    model.eval()
    one = images[:1]
    with torch.autocast(ctx.device.type, dtype=dtype):
        seconds = _timed(lambda: model.predict(one, text[:1]), ctx.device, repeats=3)
    rows.append(("speed-segment", {"status": "ok", "ms_per_image": seconds * 1000, "n_noise": 1,
                                   "note": "backbone + fusion + head, one image"}))
    return rows


# -------------------------------------------------------------------------------------------------- runner


def run_checks(ctx: Context, skip: set[str]) -> list[dict]:
    plan: list[tuple[str, Callable[[], object]]] = [
        ("train-bf16", lambda: check_train_autocast(ctx, torch.bfloat16)),
        ("train-fp16", lambda: check_train_autocast(ctx, torch.float16)),
        ("train-engine", lambda: check_train_engine(ctx)),
        ("infer-autocast", lambda: check_infer_autocast(ctx)),
        ("text-attention", lambda: check_text_attention(ctx)),
        ("multi-gpu", lambda: check_multi_gpu(ctx)),
        ("server-volume", lambda: check_server_volume(ctx)),
        ("speed", lambda: check_speed(ctx)),
    ]
    rows = []
    for name, fn in plan:
        names = [c for c in CHECKS if c.startswith("speed-")] if name == "speed" else [name]
        if set(names) <= skip or name in skip:
            rows += [{"check": n, "status": "skipped", "detail": "--skip"} for n in names]
            continue
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - a failing check is a row of the report, not the end of it
            traceback.print_exc()
            result = {"status": "failed", "detail": f"{type(exc).__name__}: {str(exc)[:300]}"}
        seconds = round(time.perf_counter() - t0, 2)
        for n, r in (result if isinstance(result, list) else [(n, result) for n in names]):
            rows.append({"check": n, "wall_seconds": seconds, **r})
        print(f"  {name}: {rows[-1]['status']} ({seconds:.1f} s)", flush=True)
    return rows


def _summary(row: dict) -> str:
    skip = {"check", "status", "wall_seconds"}
    parts = []
    for key, value in row.items():
        if key in skip:
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict):
            value = "{" + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k,
                                    v in value.items()) + "}"
        parts.append(f"{key}={value}")
    return "; ".join(parts)


def print_table(rows: list[dict]) -> None:
    width = max(len(r["check"]) for r in rows)
    print(f"\n{'check':<{width}}  status        figures")
    for row in rows:
        print(f"{row['check']:<{width}}  {row['status']:<12}  {_summary(row)}")


def not_measured(reason: str) -> dict:
    return {"cuda": False, "reason": reason, "machine": common.machine_info("cpu"),
            "rows": [{"check": c, "status": "not measured"} for c in CHECKS]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help=f"write the results here (default {DEFAULT_JSON.relative_to(ROOT)}; "
                                                  "without CUDA only when given)")
    parser.add_argument("--skip", default="", help=f"comma-separated checks to leave out: {', '.join(CHECKS)}")
    parser.add_argument("--device", default="cuda", help="which CUDA device (default cuda = cuda:0)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run the checks on the CPU at tiny sizes (tests this script)")
    parser.add_argument("--work-dir", type=Path, help="keep the check's files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(CHECKS) - {"speed"}
    if unknown:
        parser.error(f"unknown check(s) {sorted(unknown)}; known: {', '.join(CHECKS)}")

    if not torch.cuda.is_available() and not args.allow_cpu:
        reason = "no CUDA device (torch.cuda.is_available() is False)"
        print(f"gpu-check: {reason}: nothing to check. Run `make gpu-check` on a machine with an NVIDIA GPU "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}).")
        if args.json:
            common.write_json(args.json, not_measured(reason))
        return 0
    device = torch.device(args.device if torch.cuda.is_available() else "cpu")
    info = common.machine_info(device)  # with the library's inference precision on it (FASTTEXTDIFF_PRECISION)
    info.update(gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                cuda_version=torch.version.cuda, flash_attn=importlib.util.find_spec("flash_attn") is not None)
    print(f"gpu-check on {info.get('cuda') or 'CPU (--allow-cpu: tiny sizes, figures mean nothing)'}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = run_checks(Context(device, work, tiny=device.type != "cuda"), skip)
    result = {"cuda": device.type == "cuda", "machine": info, "seconds": round(time.perf_counter() - started, 1),
              "rows": rows}
    print_table(rows)
    print(f"\n{result['seconds']:.0f} s in all")
    path = args.json or (DEFAULT_JSON if device.type == "cuda" else None)
    if path:
        common.write_json(path, result)
        print(f"wrote {path}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

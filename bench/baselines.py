"""The baselines the benchmarks compare FastTextDiff against, each built from the field's own parts.

- `train_unet` / `evaluate_unet`: a supervised MONAI `UNet` (what a user would pick instead), trained
  on the same labeled subset (`select_labeled`, same seed), the same preprocessing
  (`SegmentationDataset`), loss (MONAI DiceCE, CE + 1.5 x Dice), optimiser and step budget as
  FastTextDiff, with the checkpoint chosen on the validation split; scored exactly as
  `evaluate_model` scores FastTextDiff (per-image Dice/IoU at the mask's own resolution).
- `textdiff_style_train`: the reference (TextDiff) training loop at equal model size - batch size 1,
  the text encoder re-run on every sample, the frozen backbone re-run on every (augmented) image,
  no feature or text cache - for the training-throughput ratio.
- `IterativeSampler`: a MedSegDiff-style conditional diffusion sampler on the same U-Net
  (diffusers `UNet2DModel` with the backbone's widths; input = noisy mask + image, output = noise),
  stepped by diffusers' `DDIMScheduler` - for the inference-latency ratio.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

import common  # noqa: F401  (lib/ on the path)
from fasttextdiff.data.dataset import SegmentationDataset, select_labeled
from fasttextdiff.data.io import read_image
from fasttextdiff.data.lvit import Sample
from fasttextdiff.data.preprocess import mask_to_labels, to_model_input, to_original_grid
from fasttextdiff.utils.metrics import dice_iou


# ------------------------------------------------------------------------------------------------
# Supervised MONAI U-Net
# ------------------------------------------------------------------------------------------------


def build_unet(widths: Sequence[int], in_channels: int = 1, num_classes: int = 2, num_res_units: int = 2):
    """MONAI UNet with the backbone's widths plus one deeper level (residual units, as MONAI's tutorials)."""
    from monai.networks.nets import UNet

    channels = tuple(int(w) for w in widths) + (2 * int(widths[-1]),)
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, channels=channels,
                strides=(2,) * (len(channels) - 1), num_res_units=num_res_units)


def n_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def _score_at_model_size(net: torch.nn.Module, loader: DataLoader, num_classes: int) -> float:
    net.eval()
    dices = []
    for batch in loader:
        pred = net(batch["image"]).argmax(1)
        d, _ = dice_iou(pred, batch["label"][:, 0], num_classes)
        dices += d
    net.train()
    return float(np.mean(dices)) if dices else float("nan")


def train_unet(train_samples: Sequence[Sample], *, size: int, channels: int, widths: Sequence[int],
               labeled: float | None, seed: int, epochs: int, batch_size: int, lr: float, augment: bool,
               val_samples: Sequence[Sample] | None = None, val_every: int = 1, window=None,
               num_classes: int = 2, dice_weight: float = 1.5) -> tuple[torch.nn.Module, dict]:
    """Train the U-Net on the `labeled` subset; keep the weights with the best validation Dice."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    np.random.seed(seed)
    started = time.perf_counter()
    chosen = select_labeled([s for s in train_samples if s.mask is not None], labeled, seed=seed)
    ds = SegmentationDataset(chosen, size=size, channels=channels, num_classes=num_classes, augment=augment,
                             seed=seed, window=window)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val_loader = None
    if val_samples:
        val_ds = SegmentationDataset([s for s in val_samples if s.mask is not None], size=size, channels=channels,
                                     num_classes=num_classes, window=window)
        val_loader = DataLoader(val_ds, batch_size=2 * batch_size)
    net = build_unet(widths, in_channels=channels, num_classes=num_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=dice_weight, lambda_ce=1.0)
    best, best_epoch, best_state, steps = -1.0, 0, None, 0
    net.train()
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:
            loss = loss_fn(net(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        last = epoch + 1 == epochs
        if val_loader is not None and ((epoch + 1) % val_every == 0 or last):
            score = _score_at_model_size(net, val_loader, num_classes)
            if score > best:
                best, best_epoch, best_state = score, epoch + 1, copy.deepcopy(net.state_dict())
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return net, {"best_val_dice": best if best_state is not None else None, "best_epoch": best_epoch,
                 "epochs": epochs, "steps": steps, "labeled_images": len(chosen), "augment": augment,
                 "parameters": n_params(net), "seconds": round(time.perf_counter() - started, 2)}


@torch.no_grad()
def evaluate_unet(net: torch.nn.Module, samples: Sequence[Sample], *, size: int, channels: int, window=None,
                  num_classes: int = 2) -> dict:
    """Per-image Dice/IoU at the mask's own resolution - the same protocol as `evaluate_model`."""
    net.eval()
    rows = []
    for sample in [s for s in samples if s.mask is not None]:
        image = read_image(sample.image)
        x = to_model_input(image, size, channels, window=window)
        probs = torch.softmax(net(x).float(), dim=1)
        grid = to_original_grid(probs, image, mode="bilinear")
        pred = grid.argmax(0).astype(np.int64)
        truth = mask_to_labels(read_image(sample.mask).array, num_classes).astype(np.int64)
        d, i = dice_iou(torch.from_numpy(pred[None]), torch.from_numpy(truth[None]), num_classes)
        rows.append({"name": sample.name, "dice": d[0], "iou": i[0]})
    dice = np.array([r["dice"] for r in rows])
    iou = np.array([r["iou"] for r in rows])
    return {"n": len(rows), "dice_mean": float(dice.mean()), "dice_std": float(dice.std()),
            "iou_mean": float(iou.mean()), "iou_std": float(iou.std()), "per_image": rows}


# ------------------------------------------------------------------------------------------------
# TextDiff-style reference training loop
# ------------------------------------------------------------------------------------------------


def encode_uncached(encoder, text: str, max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and run the text encoder now (no cache), as the reference data loader does per sample.

    `max_tokens` truncates like the reference's `max_length=10`; None keeps the whole report.
    """
    kwargs = {"truncation": True, "max_length": max_tokens} if max_tokens else {}
    tok = encoder.tokenizer([text], return_tensors="pt", **kwargs)
    tok = {k: v.to(encoder.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        states = encoder.model(**tok).last_hidden_state.float()
    return states, tok["attention_mask"].bool()


def textdiff_style_train(model, samples: Sequence[Sample], encoder, *, n_images: int, lr: float = 1e-4,
                         augment: bool = True, max_tokens: int | None = None, seed: int = 0,
                         dice_weight: float = 1.5) -> dict:
    """Train `model` (a FastTextDiffModel) the reference way for `n_images` samples; returns throughput.

    Batch size 1; each step: augment the image, re-encode its report, run the frozen backbone
    (three noised copies), fusion + head forward/backward, Adam step. Nothing is cached.
    """
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    cfg = model.backbone.config
    ds = SegmentationDataset(list(samples), size=cfg.image_size, channels=cfg.in_channels,
                             num_classes=model.config.num_classes, augment=augment, seed=seed, window=cfg.window)
    loader = DataLoader(ds, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=dice_weight, lambda_ce=1.0)
    model.train()
    done, epoch = 0, 0
    started = time.perf_counter()
    while done < n_images:
        ds.set_epoch(epoch)
        for batch in loader:
            states = mask = None
            if model.config.use_text:
                states, mask = encode_uncached(encoder, batch["text"][0], max_tokens)
            logits = model(batch["image"], states, mask)
            loss = loss_fn(logits.float(), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done >= n_images:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    return {"images": done, "seconds": seconds, "images_per_s": done / seconds, "batch_size": 1,
            "max_tokens": max_tokens, "augment": augment, "loss_last": float(loss.detach())}


# ------------------------------------------------------------------------------------------------
# MedSegDiff-style iterative sampler
# ------------------------------------------------------------------------------------------------


class IterativeSampler:
    """Mask generation by reverse diffusion, conditioned on the image (MedSegDiff's scheme).

    The denoiser is a diffusers `UNet2DModel` with the backbone's architecture (widths, layers,
    attention) and in_channels = mask + image; every step is one full U-Net forward. Weights are
    random: the cost of a step does not depend on them (this measures latency, not accuracy).
    """

    def __init__(self, backbone, steps: int = 50, seed: int = 0, device=None):
        from diffusers import DDIMScheduler, UNet2DModel

        torch.manual_seed(seed)
        config = dict(backbone.unet.config)
        config.update(in_channels=backbone.config.in_channels + 1, out_channels=1)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        self.unet = UNet2DModel.from_config(config).eval().requires_grad_(False)
        if device is not None:
            self.unet.to(device)
        self.scheduler = DDIMScheduler(num_train_timesteps=backbone.config.num_train_timesteps,
                                       beta_schedule=backbone.config.beta_schedule)
        self.steps = steps
        self.seed = seed

    @torch.inference_mode()
    def sample(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> binary masks (B, H, W) after `steps` DDIM steps."""
        self.scheduler.set_timesteps(self.steps)
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn((images.shape[0], 1, *images.shape[2:]), generator=gen).to(images.device)
        for t in self.scheduler.timesteps:
            eps = self.unet(torch.cat([x, images], dim=1), t, return_dict=False)[0]
            x = self.scheduler.step(eps, t, x).prev_sample
        return (x[:, 0] > 0).to(torch.uint8)


__all__ = ["build_unet", "train_unet", "evaluate_unet", "textdiff_style_train", "encode_uncached",
           "IterativeSampler", "n_params"]

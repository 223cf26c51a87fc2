"""The batched prediction core behind `Segmenter`: every slice's noise draws and timesteps in few forwards.

Why its own module: each speed measure here is a switch (`InferenceOptions`) so the speed benchmark
can switch them off one at a time, and `reference()` keeps the plain path (MONAI's SliceInferer over
`FastTextDiffModel.predict`, one U-Net forward per draw) for the before/after Dice check.

What the fast path changes, and why the result stays the model's:
- the n_noise draws of a batch of slices go through the backbone together with the T timesteps
  (one forward of slices x draws x T items, capped at `max_batch_items` so activations stay small);
- every slice sees the same noise field per draw (the one a 2D image gets), so a slice's output
  does not depend on which other slices share its batch or were skipped;
- slices that are air (every input pixel at the lowest intensity, i.e. outside the body) skip the
  network: background with certainty;
- channels_last memory format for the convolutions, `torch.inference_mode`, and reduced-precision
  autocast only where the hardware runs it natively (bf16 on CPUs with AVX512-BF16/AMX, fp16 on CUDA).

Precision is one switch for the library, the CLI, the server and the benchmarks: `InferenceOptions.precision`
defaults to the environment variable FASTTEXTDIFF_PRECISION (auto|fp32|bf16|fp16, unset = auto), and an
explicit precision in code (or the CLI's --precision) wins over it. `auto` depends on the hardware, so
results differ between machines by the dtype's rounding; forcing `bf16` (emulated where the CPU lacks it,
slower but the same numbers) or `fp32` makes any machine reproduce another's. fp16 on a CPU is torch's CPU
autocast (native with AVX512-FP16/AMX-FP16, emulated elsewhere); `auto` never picks it there.

Features cannot be reused across draws: the noise enters at the input of a non-linear U-Net, so each
draw needs its own forward. `uncertainty="softmax"` is the cheap alternative: one draw, and the
Bernoulli std sqrt(p(1-p)) of the foreground probability instead of the spread over draws.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass, field, replace

import torch
from monai.inferers import SliceInferer

from fasttextdiff.models.segmenter import FastTextDiffModel

__all__ = ["InferenceOptions", "predict_slices", "native_low_precision", "resolve_precision", "air_slices",
           "precision_from_env", "precision_record", "is_native", "autocast_supported", "PRECISION_ENV", "PRECISIONS"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_ENV = "FASTTEXTDIFF_PRECISION"
UNCERTAINTY_KINDS = ("draws", "softmax")
_DTYPE_NAMES = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def precision_from_env() -> str:
    """The precision FASTTEXTDIFF_PRECISION asks for ("auto" when unset or empty): the default of every
    `InferenceOptions`, so one exported variable reaches the library, CLI, server and benchmarks alike."""
    raw = os.environ.get(PRECISION_ENV, "")
    value = raw.strip().lower() or "auto"
    if value not in PRECISIONS:
        raise ValueError(f"environment variable {PRECISION_ENV} must be one of {', '.join(PRECISIONS)} "
                         f"(or unset, which means auto), got {raw!r}")
    return value


@dataclass(frozen=True)
class InferenceOptions:
    batch_draws: bool = True  # the n_noise draws in the same backbone forward as the timesteps
    channels_last: bool = True  # NHWC convolutions (oneDNN/cuDNN's native layout)
    # auto = bf16/fp16 only where the hardware has it natively, else fp32; default: $FASTTEXTDIFF_PRECISION
    precision: str = field(default_factory=precision_from_env)
    skip_air: bool = True  # slices that are all air skip the network
    max_batch_items: int = 12  # backbone items (slices x draws x timesteps) per forward: bounds activation memory
    uncertainty: str = "draws"  # "draws": std over the n_noise draws; "softmax": one draw, sqrt(p(1-p))
    reference_path: bool = False  # the plain path: SliceInferer over model.predict (the benchmark's "before")
    # volumes: foreground components below this many mm³ are dropped (`inference.postprocess`); 0 keeps all
    min_component_mm3: float = 0.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.uncertainty not in UNCERTAINTY_KINDS:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY_KINDS}, got {self.uncertainty!r}")
        if self.min_component_mm3 < 0:
            raise ValueError(f"min_component_mm3 must be >= 0, got {self.min_component_mm3}")
        if self.max_batch_items < 1:
            raise ValueError(f"max_batch_items must be >= 1, got {self.max_batch_items}")

    @classmethod
    def reference(cls) -> "InferenceOptions":
        """Every speed measure off: what inference did before this module."""
        return cls(batch_draws=False, channels_last=False, precision="fp32", skip_air=False, reference_path=True)

    def but(self, **changes) -> "InferenceOptions":
        return replace(self, **changes)


def native_low_precision(device: torch.device) -> torch.dtype | None:
    """The reduced-precision dtype this device computes natively, or None (then fp32 is fastest)."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # AVX512-BF16 / AMX; emulated bf16 is slower than fp32
                return torch.bfloat16
        except (AttributeError, RuntimeError):
            return None
    return None


@functools.lru_cache(maxsize=None)
def autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build autocasts to `dtype` on `device_type`. Builds without it warn and run fp32
    (CPU fp16 in old torch) or raise (bf16 on pre-Ampere GPUs): either way the precision asked for is not
    the one used, so `resolve_precision` says so instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type, dtype=dtype):
                return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype
        except (RuntimeError, ValueError, AssertionError):
            return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None = plain fp32); ValueError where torch cannot
    autocast to it there (never a silent fp32 that reports itself as reduced precision)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "auto":
        return native_low_precision(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if not autocast_supported(device.type, dtype):
        raise ValueError(f"precision {precision!r} (the precision option or {PRECISION_ENV}) is not available on "
                         f"{device.type} with torch {torch.__version__}: its autocast has no {dtype}; use fp32 or "
                         "auto")
    return dtype


def is_native(dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether `device` computes `dtype` in hardware (fp32 always; emulated bf16/fp16 on a CPU is many times
    slower)."""
    device = torch.device(device)
    if dtype is None or dtype == torch.float32 or device.type == "cuda":
        return True
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(check and getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


def precision_record(precision: str | None, device: torch.device | str) -> dict:
    """What a run computes in, for `/info` and the benchmark JSON: the setting, the dtype it resolves to on
    `device`, whether that is native there, and the variable's value (numbers from two machines compare
    only at the same compute dtype)."""
    precision = precision_from_env() if precision is None else precision
    device = torch.device(device)
    dtype = resolve_precision(precision, device)
    return {"precision": precision, "compute_dtype": _DTYPE_NAMES[dtype], "native": is_native(dtype, device),
            "device": str(device), "precision_env": os.environ.get(PRECISION_ENV) or None}


def air_slices(x: torch.Tensor, tolerance: float = 0.02) -> torch.Tensor:
    """(N,) bool: slices whose every pixel sits at the lowest model intensity (-1), i.e. air or padding."""
    return x.flatten(1).amax(1) <= -1.0 + tolerance


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def set_memory_format(model: FastTextDiffModel, channels_last: bool) -> None:
    """Convert the model's 4D weights once (idempotent); the layout change does not change the maths."""
    wanted = "channels_last" if channels_last else "contiguous"
    if getattr(model, "_fasttextdiff_memory_format", "contiguous") != wanted:
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model._fasttextdiff_memory_format = wanted


def predict_slices(model: FastTextDiffModel, x: torch.Tensor, states: torch.Tensor | None, mask: torch.Tensor | None,
                   n_noise: int, options: InferenceOptions, device: torch.device,
                   slice_batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softmax `(N, K, S, S)` and uncertainty `(N, S, S)` (CPU, float32) for model-input slices `x`.

    `states`/`mask` are one report's encoding (batch 1); `slice_batch` is the reference path's batch.
    """
    if options.reference_path:
        return _predict_reference(model, x, states, mask, n_noise, device, slice_batch)
    n_draws = 1 if options.uncertainty == "softmax" else n_noise
    n, k_classes, size = x.shape[0], model.config.num_classes, x.shape[-1]
    probs = torch.zeros(n, k_classes, size, size)
    probs[:, 0] = 1.0  # air: background with certainty
    unc = torch.zeros(n, size, size)
    keep = (~air_slices(x)).nonzero().flatten() if options.skip_air else torch.arange(n)
    if len(keep) == 0:
        return probs, unc
    set_memory_format(model, options.channels_last)
    dtype = resolve_precision(options.precision, device)
    fmt = torch.channels_last if options.channels_last else torch.contiguous_format
    backbone = model.backbone
    t_count = len(backbone.config.timesteps)
    base = backbone.config.noise_seed
    eps = [backbone.noise(x[:1], base + k) for k in range(n_draws)]  # one field per draw, shared by all slices
    draws_per_forward = n_draws if options.batch_draws else 1
    per_forward = max(1, options.max_batch_items // (t_count * draws_per_forward))
    with torch.inference_mode(), _autocast(device, dtype):
        for start in range(0, len(keep), per_forward):
            idx = keep[start:start + per_forward]
            xb = x[idx].to(device)
            b = xb.shape[0]
            draw_probs = []
            for first in range(0, n_draws, draws_per_forward):
                ks = range(first, min(n_draws, first + draws_per_forward))
                xin = xb.repeat(len(ks), 1, 1, 1).contiguous(memory_format=fmt)  # draw-major
                noise = torch.cat([eps[k].expand(b, -1, -1, -1) for k in ks]).to(device).contiguous(memory_format=fmt)
                feats = backbone.features(xin, noise=noise)
                st = None if states is None else states.expand(len(xin), -1, -1)
                mk = None if mask is None else mask.expand(len(xin), -1)
                logits = model.forward_features(feats, st, mk)
                draw_probs.append(torch.softmax(logits.float(), dim=1).reshape(len(ks), b, k_classes, size, size))
            draws = torch.cat(draw_probs)  # (n_draws, b, K, S, S)
            mean = draws.mean(0)
            if options.uncertainty == "softmax":
                fg = mean[:, 1:]
                u = (fg * (1 - fg)).clamp_min(0).sqrt().amax(1)
            elif n_draws > 1:
                u = draws[:, :, 1:].std(0, unbiased=False).amax(1)
            else:
                u = torch.zeros(b, size, size, device=mean.device)
            probs[idx] = mean.cpu()
            unc[idx] = u.float().cpu()
    return probs, unc


def _predict_reference(model, x, states, mask, n_noise, device, slice_batch):
    """The plain path: MONAI's SliceInferer over `model.predict` (one U-Net forward per draw)."""
    set_memory_format(model, False)

    def predict(slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = slices.shape[0]
        pred = model.predict(slices, None if states is None else states.expand(n, -1, -1),
                             None if mask is None else mask.expand(n, -1), n_noise=n_noise)
        return pred.probabilities, pred.uncertainty[:, None]

    with torch.inference_mode():
        inferer = SliceInferer(roi_size=tuple(x.shape[-2:]), sw_batch_size=slice_batch, spatial_dim=2, overlap=0.0,
                               sw_device=device, device=torch.device("cpu"), progress=False)
        probs, unc = inferer(x.permute(1, 2, 3, 0)[None], predict)  # slices along the last axis
    return probs[0].permute(3, 0, 1, 2), unc[0, 0].permute(2, 0, 1)

"""The one place that decides which torch device a run uses (library, CLI, server, benchmarks)."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def resolve_device(device: Any = None, default: Any = "auto") -> torch.device:
    """``device`` as a torch device; ``None``, ``"auto"`` and names torch does not know (MONAI Label
    sends GPU display names, or a list of names) mean ``default``, and ``"auto"`` means CUDA when
    present, else the CPU. A CUDA device asked for on a machine without one runs on the CPU (with a
    warning), so a configuration stays valid on every machine."""
    if isinstance(device, (list, tuple)):
        device = device[0] if device else None
    if isinstance(device, str):
        try:
            device = None if device in ("", "auto") else torch.device(device)
        except RuntimeError:
            device = None
    if device is None:
        if default not in (None, "auto"):
            return resolve_device(default)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s was asked for but CUDA is not available here; running on the CPU", device)
        return torch.device("cpu")
    return device

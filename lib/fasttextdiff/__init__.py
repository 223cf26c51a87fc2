"""FastTextDiff: report-conditioned, label-efficient diffusion segmentation for medical images.

A frozen denoising U-Net gives multi-scale image features; the report's token states (ModernBERT,
or any Hugging Face encoder) steer them through cross-modal attention; a small head segments.
"""

import os as _os

# OpenMP threads that spin while waiting make torch ~10x slower whenever another process shares
# the cores (measured: a training step 2.6 s -> 0.25 s on a loaded 2-core machine). Must be set
# before torch loads its OpenMP runtime; the Makefile exports it too.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

"""FastTextDiff: report-conditioned, label-efficient diffusion segmentation for medical images.

A frozen denoising U-Net gives multi-scale image features; the report's token states (ModernBERT,
or any Hugging Face encoder) steer them through cross-modal attention; a small head segments.
"""

__version__ = "0.1.0"

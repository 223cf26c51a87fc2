"""Data: read/write images with their geometry, model-ready tensors, LViT datasets, synthetic data."""

from fasttextdiff.data.io import Image, is_volume_path, read_image, supported_extensions, write_image
from fasttextdiff.data.preprocess import mask_to_labels, to_model_input, to_original_grid

__all__ = [
    "Image",
    "is_volume_path",
    "mask_to_labels",
    "read_image",
    "supported_extensions",
    "to_model_input",
    "to_original_grid",
    "write_image",
]

"""Data: read/write images with their geometry, model-ready tensors, LViT datasets, synthetic data."""

from fasttextdiff.data.dataset import SegmentationDataset, select_labeled
from fasttextdiff.data.io import Image, is_volume_path, read_image, supported_extensions, write_image
from fasttextdiff.data.lvit import DatasetLayoutError, Sample, load_split, read_text_table, split_folder_name
from fasttextdiff.data.preprocess import canonical_array, mask_to_labels, to_model_input, to_original_grid
from fasttextdiff.data.synthetic import (
    REGIONS,
    make_lvit_dataset,
    regions_in_report,
    render_case,
    render_case_details,
    report_for_regions,
    write_text_table,
)

__all__ = [
    "DatasetLayoutError",
    "Image",
    "canonical_array",
    "REGIONS",
    "Sample",
    "SegmentationDataset",
    "is_volume_path",
    "load_split",
    "make_lvit_dataset",
    "mask_to_labels",
    "read_image",
    "read_text_table",
    "regions_in_report",
    "render_case",
    "render_case_details",
    "report_for_regions",
    "select_labeled",
    "split_folder_name",
    "supported_extensions",
    "to_model_input",
    "to_original_grid",
    "write_image",
    "write_text_table",
]

"""ReportSegmentLib: everything of the ReportSegment Slicer module that does not need Slicer.

Server talk (``client``), report text handling (``report``), label colours (``colors``),
label/segment bookkeeping (``labels``) and settings keys (``settings``). Standard library only;
never imports slicer, vtk, qt or ctk, so it runs and is tested in plain Python. Installed beside
``fasttextdiff`` by the project's wheel (desktop Slicer imports it from the module's folder).
"""

from .client import (
    DatastoreImage,
    FastTextDiffClient,
    Sample,
    SegmentationResult,
    TrainProgress,
    describe_server,
    progress_from_status,
)
from .colors import distinct_colors, label_colors
from .errors import ReportSegmentError
from .labels import SegmentSpec, export_values, label_info, segments_for_labels
from .report import (
    IMAGE_ID_ATTRIBUTE,
    MAX_REPORT_BYTES,
    REPORT_ATTRIBUTE,
    image_id_from_name,
    normalize_report,
    read_report_file,
    summarize_report,
    validate_report,
)

__all__ = [
    "DatastoreImage",
    "FastTextDiffClient",
    "IMAGE_ID_ATTRIBUTE",
    "MAX_REPORT_BYTES",
    "REPORT_ATTRIBUTE",
    "ReportSegmentError",
    "Sample",
    "SegmentSpec",
    "SegmentationResult",
    "TrainProgress",
    "describe_server",
    "distinct_colors",
    "export_values",
    "image_id_from_name",
    "label_colors",
    "label_info",
    "normalize_report",
    "progress_from_status",
    "read_report_file",
    "segments_for_labels",
    "summarize_report",
    "validate_report",
]

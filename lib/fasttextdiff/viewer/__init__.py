"""The web annotation viewer: `fasttextdiff viewer --server URL` (trame-slicer on slicer-core).

A browser page on 127.0.0.1 for the whole loop against a FastTextDiff MONAI Label server: pick an
image from the datastore (with its report and label status) or open a file, edit the report,
Segment, review the label and the uncertainty heat map, paint/erase, submit, next sample, train.
It runs the Report Segment Slicer module's own scene logic (`slicer_module/ReportSegment`), so the
desktop module and the viewer share one implementation.

Importing this package is cheap; trame, VTK and Slicer load when the viewer starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The Slicer module folder holding ReportSegmentLib and ReportSegmentScene.
MODULE_DIR = Path(__file__).resolve().parents[3] / "slicer_module" / "ReportSegment"


def report_segment_path() -> Path:
    """Make the Slicer module's packages importable (they live with the module, not in this
    library, so the desktop module stays self-contained)."""
    if not (MODULE_DIR / "ReportSegmentScene").is_dir():
        from fasttextdiff.utils.errors import FastTextDiffError

        raise FastTextDiffError(
            f"the Report Segment module is not at {MODULE_DIR}; run the viewer from a checkout of the repository"
        )
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    return MODULE_DIR

"""The web annotation viewer: `fasttextdiff viewer --server URL` (trame-slicer on slicer-core).

A browser page on 127.0.0.1 for the whole loop against a FastTextDiff MONAI Label server: pick an
image from the datastore (with its report and label status) or open a file, edit the report,
Segment, review the label and the uncertainty heat map, paint/erase, submit, next sample, train.
It runs the Report Segment Slicer module's own scene logic: the packages `ReportSegmentScene` (MRML
only) and `ReportSegmentLib` (the HTTP client), which live in `slicer_module/ReportSegment` for
desktop Slicer and are installed beside `fasttextdiff` by the same wheel (or editable install), so
the desktop module and the viewer share one implementation.

Importing this package is cheap; trame, VTK and Slicer load when the viewer starts.
"""

from __future__ import annotations

from pathlib import Path

#: The page's icon: a copy of the Slicer module's (Resources/Icons/ReportSegment.png), shipped in the wheel.
FAVICON = Path(__file__).resolve().with_name("favicon.png")

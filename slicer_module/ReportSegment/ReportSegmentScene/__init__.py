"""ReportSegmentScene: the module's work on a MRML scene, on MRML and logic classes only.

Runs wherever ``import slicer`` gives Slicer's MRML and logic classes: inside desktop Slicer
(wrapped by the module's ``ReportSegmentLogic``), and on the ``slicer-core`` wheel without Qt
(the web viewer in ``lib/fasttextdiff/viewer`` and the tests). Never imports qt, ctk,
``slicer.util`` or ``slicer.app``.

Desktop Slicer imports it from the module's folder; the project's wheel and editable install put it,
with ``ReportSegmentLib``, beside ``fasttextdiff`` as a top-level package (``pyproject.toml``), which
is how the viewer imports it.
"""

from . import nodes
from .logic import (
    FILE_EXTENSION,
    LABEL_COLORS_REFERENCE,
    LABELS_ATTRIBUTE,
    SEGMENTATION_REFERENCE,
    UNCERTAINTY_REFERENCE,
    ReportSegmentSceneLogic,
)

__all__ = [
    "FILE_EXTENSION",
    "LABELS_ATTRIBUTE",
    "LABEL_COLORS_REFERENCE",
    "SEGMENTATION_REFERENCE",
    "UNCERTAINTY_REFERENCE",
    "ReportSegmentSceneLogic",
    "nodes",
]

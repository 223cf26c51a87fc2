"""Label bookkeeping between the server's label values and Slicer's named segments, kept free of
Slicer so it can be tested in plain Python."""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, NamedTuple

from .colors import RGB, label_colors


class SegmentSpec(NamedTuple):
    name: str
    value: int  # the voxel value in the server's label file
    color: RGB


def segments_for_labels(labels: Mapping[str, int]) -> List[SegmentSpec]:
    """One segment per foreground label of an infer result, in label-value order, each with a
    distinct colour. ``background`` (and value 0) is skipped."""
    ordered = sorted(
        ((str(name), int(value)) for name,
         value in labels.items() if int(value) != 0 and str(name).lower() != "background"),
        key=lambda item: item[1],
    )
    colors = label_colors(name for name, _ in ordered)
    return [SegmentSpec(name, value, colors[name]) for name, value in ordered]


def export_values(segment_names: Iterable[str], server_labels: Mapping[str, int]) -> List[SegmentSpec]:
    """Voxel values for exporting edited segments as one labelmap.

    Segments named like a server label keep that label's value (so a corrected label means
    the same as the model's output); segments the user added get the next free values, in the
    order they appear. Returns specs in ascending value order (the order Slicer's export assigns
    1..N is then remapped by the caller, or the caller writes values itself)."""
    known = {str(k): int(v) for k, v in server_labels.items() if int(v) != 0 and str(k).lower() != "background"}
    used = set(known.values())
    names = [n for n in segment_names if n and n.lower() != "background"]
    colors = label_colors(names)
    next_value = max(used, default=0) + 1
    specs: List[SegmentSpec] = []
    seen = set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        if name in known:
            value = known[name]
        else:
            while next_value in used:
                next_value += 1
            value = next_value
            used.add(value)
        specs.append(SegmentSpec(name, value, colors[name]))
    return sorted(specs, key=lambda spec: spec.value)


def label_info(specs: Iterable[SegmentSpec]) -> List[Dict[str, object]]:
    """The ``label_info`` list sent with a saved label (MONAI Label's convention: name + idx)."""
    return [{"name": spec.name, "idx": spec.value, "color": list(spec.color)} for spec in specs]

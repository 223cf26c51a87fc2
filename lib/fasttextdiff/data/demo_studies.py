"""`fasttextdiff demo-studies`: a MONAI Label studies folder to try the server on.

Synthetic chest-X-ray-like 2D PNGs and small CT-like 3D NIfTI volumes, each with its report in
the datastore's image info (`text`, written through MONAI Label's own `LocalDatastore`, so the
server reads it back unchanged), and a few with final labels. The 2D cases are the
"text-necessary" synthetic variant: the report names which of the visible lesions are labeled,
so a model that ignores the text cannot get them right — the point of report conditioning.
Volumes are built from one rendered case by letting each lesion grow and shrink over the slices.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
from scipy.ndimage import distance_transform_edt

from fasttextdiff.data.io import Image, write_image
from fasttextdiff.data.synthetic import render_case_details

log = logging.getLogger(__name__)

DATASTORE_EXTENSIONS = ("*.nii.gz", "*.nii", "*.nrrd", "*.png", "*.jpg")
VOLUME_SPACING = (0.8, 0.8, 2.5)  # x, y, z in mm (SimpleITK order)


def _volume_case(rng: np.random.Generator, size: int, slices: int, variant: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(int16 CT-like volume (Z, Y, X), uint8 mask (Z, Y, X), report) from one rendered case."""
    case = render_case_details(rng, size, variant)
    image = case.image.astype(np.float32)
    lesions_any = np.zeros_like(case.mask, dtype=bool)
    for lesion in case.lesion_masks:
        lesions_any |= lesion
    lung = (case.region_map > 0) & ~lesions_any
    lung_level = float(np.median(image[lung])) if lung.any() else float(image.min())
    volume = np.empty((slices, size, size), np.float32)
    mask = np.zeros((slices, size, size), np.uint8)
    centers = [rng.uniform(0.3, 0.7) * slices for _ in case.lesion_masks]
    radii = [rng.uniform(0.25, 0.4) * slices for _ in case.lesion_masks]
    depth = [distance_transform_edt(lesion) for lesion in case.lesion_masks]
    for z in range(slices):
        plane = image.copy()
        for lesion, dist, zc, r, keep in zip(case.lesion_masks, depth, centers, radii, case.labeled):
            w = 1.0 - ((z - zc) / r) ** 2
            present = dist > (1.0 - np.sqrt(max(w, 0.0))) * dist.max() if w > 0 else np.zeros_like(lesion)
            gone = lesion & ~present
            plane[gone] = lung_level + rng.normal(0, 4.0, int(gone.sum()))
            if keep:
                mask[z][present] = 1
        volume[z] = plane
    hu = np.clip(volume * 8.0 - 1000.0, -1024, 3071).round().astype(np.int16)  # uint8-ish grey to HU-like
    return hu, mask, case.report


def make_demo_studies(
    out: str | Path,
    n_2d: int = 24,
    n_3d: int = 4,
    size: int = 128,
    n_labeled: int = 8,
    n_labeled_3d: int = 1,
    volume_size: int = 64,
    volume_slices: int = 16,
    variant: str = "text-necessary",
    seed: int = 0,
) -> dict:
    """Write a studies folder under `out`; returns a summary (ids, labeled ids).

    Refuses a folder that already holds a datastore, so a user's studies are never overwritten.
    """
    from monailabel.datastore.local import LocalDatastore

    out = Path(out)
    if n_2d < 0 or n_3d < 0 or n_2d + n_3d == 0:
        raise ValueError("demo studies need at least one image (n_2d + n_3d >= 1)")
    if not 0 <= n_labeled <= n_2d or not 0 <= n_labeled_3d <= n_3d:
        raise ValueError("n_labeled must be in [0, n_2d] and n_labeled_3d in [0, n_3d]")
    if (out / "datastore_v2.json").exists() or (out.is_dir() and any(out.glob("*.png"))):
        raise FileExistsError(f"{out} already holds studies; choose a new folder or delete it first")
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    datastore = LocalDatastore(str(out), extensions=list(DATASTORE_EXTENSIONS), auto_reload=False)
    images, labeled = [], []
    with tempfile.TemporaryDirectory(prefix=".demo-", dir=out) as tmp:
        tmp = Path(tmp)
        for i in range(n_2d):
            case = render_case_details(rng, size, variant)
            image_id = f"cxr_{i:03d}"
            like = Image(case.image, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False)
            src = write_image(tmp / f"{image_id}.png", case.image, like)
            datastore.add_image(image_id, str(src), {"text": case.report, "kind": "cxr-2d", "demo": True})
            images.append(image_id)
            if i < n_labeled:
                lab = write_image(tmp / f"{image_id}_label.png", case.mask, like)
                datastore.save_label(image_id, str(lab), "final", {"source": "demo-studies"})
                labeled.append(image_id)
        for i in range(n_3d):
            volume, mask, report = _volume_case(rng, volume_size, volume_slices, variant)
            image_id = f"ct_{i:03d}"
            like = Image(volume, VOLUME_SPACING, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), True)
            src = write_image(tmp / f"{image_id}.nii.gz", volume, like)
            datastore.add_image(image_id, str(src), {"text": report, "kind": "ct-3d", "demo": True})
            images.append(image_id)
            if i < n_labeled_3d:
                lab = write_image(tmp / f"{image_id}_label.nii.gz", mask, like)
                datastore.save_label(image_id, str(lab), "final", {"source": "demo-studies"})
                labeled.append(image_id)
    summary = {"studies": str(out), "images": images, "labeled": labeled, "seed": seed, "variant": variant}
    log.info("wrote %d images (%d labeled) to %s", len(images), len(labeled), out)
    return summary


def add_demo_studies_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("studies/demo"), help="studies folder to create")
    parser.add_argument("--n-2d", type=int, default=24, help="synthetic chest X-ray PNGs")
    parser.add_argument("--n-3d", type=int, default=4, help="synthetic CT-like NIfTI volumes")
    parser.add_argument("--size", type=int, default=128, help="2D image side in pixels")
    parser.add_argument("--n-labeled", type=int, default=8, help="2D images given a final label")
    parser.add_argument("--n-labeled-3d", type=int, default=1, help="volumes given a final label")
    parser.add_argument("--volume-size", type=int, default=64, help="volume in-plane side")
    parser.add_argument("--volume-slices", type=int, default=16, help="slices per volume")
    parser.add_argument("--variant", choices=("text-necessary", "standard"), default="text-necessary",
                        help="text-necessary: look-alike lesions, only those the report names are labeled")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same studies)")


def run_demo_studies(args: argparse.Namespace) -> int:
    summary = make_demo_studies(args.out, n_2d=args.n_2d, n_3d=args.n_3d, size=args.size, n_labeled=args.n_labeled,
                                n_labeled_3d=args.n_labeled_3d, volume_size=args.volume_size,
                                volume_slices=args.volume_slices, variant=args.variant, seed=args.seed)
    print(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in summary.items()}))
    return 0

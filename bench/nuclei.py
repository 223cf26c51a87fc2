"""The real fluorescence nuclei image (Kaggle DSB 2018, CC0; shipped in the stardist wheel) as an
LViT-layout dataset of non-overlapping tiles, each with a short report.

Source: `<site-packages>/stardist/data/images/img2d.tif` (512x512 uint16) and `mask2d.tif` (its expert
instance mask, 125 nuclei), read with tifffile (importing stardist would need TensorFlow). Nothing
of the package is copied into the repository; the tiles are written to a work folder at run time.

Tiling: the image is cut into a grid of `tile` x `tile` tiles that do not overlap; a seeded
permutation (fixed, independent of the benchmark seeds) assigns whole tiles to Train/Val/Test.
Intensities are scaled once for the whole image (0.5-99.8 percentiles -> 0..255), so a tile with
few nuclei is not stretched to look like a crowded one; the benchmarks then read tiles through a
fixed window (`WINDOW`) instead of per-tile percentiles.

Reports, one sentence per tile, in the style of a pathologist's short note, derived from the
expert mask the way LViT's reports are derived from its annotations: the nuclei count band (a nucleus
counts for the tile holding at least half of its area or 60 px of it), how much of the tile they
cover, and where they cluster (the foreground's centre of mass on a 3x3 grid), e.g.
"Fluorescence microscopy tile, three to five nuclei, moderate coverage, clustered in the upper left."

    python bench/nuclei.py OUT [--tile 64]       # writes OUT in the LViT layout and prints the tiles
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import common  # noqa: F401  (lib/ on the path, offline)

WINDOW = (127.5, 255.0)  # (center, width) on the written uint8 tiles: identity mapping to [-1, 1]
SPLIT_FRACTIONS = {"Train": 0.5, "Val": 0.125, "Test": 0.375}
_BANDS = ((0, 0, "no nuclei"), (1, 2, "one or two nuclei"), (3, 5, "three to five nuclei"),
          (6, 10, "six to ten nuclei"), (11, 10**9, "more than ten nuclei"))
_ROWS, _COLS = ("upper", "middle", "lower"), ("left", "centre", "right")


def source_files() -> tuple[Path, Path]:
    image = common.site_packages_file("stardist", "data", "images", "img2d.tif")
    mask = common.site_packages_file("stardist", "data", "images", "mask2d.tif")
    return image, mask


def load_source() -> tuple[np.ndarray, np.ndarray]:
    """(image uint16 512x512, instance mask uint16 512x512)."""
    import tifffile

    image_path, mask_path = source_files()
    return tifffile.imread(image_path), tifffile.imread(mask_path)


def count_band(n: int) -> str:
    for lo, hi, words in _BANDS:
        if lo <= n <= hi:
            return words
    raise ValueError(n)


def tile_report(instances: np.ndarray, full_areas: dict[int, int]) -> tuple[str, dict]:
    """One sentence for a tile of the instance mask, and the facts it was built from."""
    ids, counts = np.unique(instances[instances > 0], return_counts=True)
    nuclei = [int(i) for i, c in zip(ids, counts) if c >= 60 or c >= 0.5 * full_areas[int(i)]]
    fg = instances > 0
    coverage = float(fg.mean())
    facts = {"nuclei": len(nuclei), "coverage": round(coverage, 3), "cluster": None}
    if not fg.any():
        return "Fluorescence microscopy tile, no nuclei, background only.", facts
    cover_words = "sparse coverage" if coverage < 0.1 else "moderate coverage" if coverage < 0.3 else "dense coverage"
    yy, xx = np.nonzero(fg)
    h, w = fg.shape
    row = _ROWS[min(2, int(3 * yy.mean() / h))]
    col = _COLS[min(2, int(3 * xx.mean() / w))]
    if (row, col) == ("middle", "centre"):
        where = "the centre"
    elif row == "middle":
        where = f"the {col} side"
    elif col == "centre":
        where = f"the {row} part"
    else:
        where = f"the {row} {col}"
    facts["cluster"] = where
    band = count_band(len(nuclei)) if nuclei else "fragments of nuclei at the edge"
    return f"Fluorescence microscopy tile, {band}, {cover_words}, clustered in {where}.", facts


def make_nuclei_dataset(out: str | Path, tile: int = 64, split_seed: int = 0) -> Path:
    """Write the tiles in the LViT layout (img/, labelcol/ binary 0/255 PNGs, *_text.xlsx) + tiles.json."""
    from PIL import Image as PILImage

    from fasttextdiff.data.synthetic import write_text_table

    image, instances = load_source()
    h, w = image.shape
    if h % tile or w % tile:
        raise ValueError(f"tile {tile} must divide the image size {h}x{w}")
    lo, hi = np.percentile(image, [0.5, 99.8])
    scaled = np.clip((image.astype(np.float32) - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
    ids, areas = np.unique(instances[instances > 0], return_counts=True)
    full_areas = {int(i): int(a) for i, a in zip(ids, areas)}
    grid = [(r, c) for r in range(h // tile) for c in range(w // tile)]
    order = np.random.default_rng(split_seed).permutation(len(grid))
    n_train = int(round(SPLIT_FRACTIONS["Train"] * len(grid)))
    n_val = int(round(SPLIT_FRACTIONS["Val"] * len(grid)))
    assignment = {"Train": order[:n_train], "Val": order[n_train:n_train + n_val], "Test": order[n_train + n_val:]}
    out = Path(out)
    record = {"source": {"image": str(source_files()[0]), "mask": str(source_files()[1]), "nuclei": len(full_areas),
                         "intensity_percentiles": [float(lo), float(hi)]},
              "tile": tile, "split_seed": split_seed, "window": list(WINDOW), "tiles": []}
    for split, indices in assignment.items():
        img_dir, mask_dir = out / f"{split}_Folder" / "img", out / f"{split}_Folder" / "labelcol"
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        rows = {}
        for index in sorted(indices.tolist()):
            r, c = grid[index]
            ys, xs = slice(r * tile, (r + 1) * tile), slice(c * tile, (c + 1) * tile)
            name = f"tile_r{r}_c{c}.png"
            PILImage.fromarray(scaled[ys, xs]).save(img_dir / name)
            PILImage.fromarray(((instances[ys, xs] > 0) * 255).astype(np.uint8)).save(mask_dir / name)
            report, facts = tile_report(instances[ys, xs], full_areas)
            rows[name] = report
            record["tiles"].append({"split": split.lower(), "name": name, "row": r, "col": c, "report": report,
                                    **facts})
        write_text_table(out / f"{split}_text.xlsx", rows)
    common.write_json(out / "tiles.json", record)
    return out


def summary_lines(record: dict) -> list[str]:
    lines = []
    for split in ("train", "val", "test"):
        tiles = [t for t in record["tiles"] if t["split"] == split]
        counts = [t["nuclei"] for t in tiles]
        lines.append(f"{split}: {len(tiles)} tiles, {sum(counts)} nuclei counted, "
                     f"coverage mean {np.mean([t['coverage'] for t in tiles]):.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tile", type=int, default=64)
    args = parser.parse_args(argv)
    make_nuclei_dataset(args.out, tile=args.tile)
    record = json.loads((args.out / "tiles.json").read_text())
    for t in record["tiles"]:
        print(f"{t['split']:5s} {t['name']:16s} {t['nuclei']:2d} nuclei  {t['report']}")
    print("\n".join(summary_lines(record)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

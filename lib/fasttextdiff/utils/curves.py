"""Training curves as a PNG beside a run's metrics: loss and validation Dice per epoch (matplotlib, Agg).

The JSON history stays the record; the picture is for a person checking a run at a glance.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fasttextdiff.utils.atomic import atomic_path

log = logging.getLogger(__name__)
CURVE_FILE = "training_curve.png"


def write_training_curve(history: list[dict], path: str | Path, title: str = "training") -> Path | None:
    """Draw `history` (records with `epoch`, `loss`, optional `val_dice`) to `path`; None when empty."""
    rows = [r for r in history if isinstance(r.get("epoch"), int) and isinstance(r.get("loss"), (int, float))]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in server threads

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["loss"] for r in rows], color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    val = [(r["epoch"], r["val_dice"]) for r in rows if isinstance(r.get("val_dice"), (int, float))]
    if val:
        ax2 = ax.twinx()
        ax2.plot([e for e, _ in val], [d for _, d in val], color="tab:orange", marker="o", label="validation Dice")
        ax2.set_ylabel("validation Dice", color="tab:orange")
        ax2.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path

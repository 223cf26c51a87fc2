"""The one resume policy of the three training loops (segmenter, backbone pretraining, text MLM).

Where. A run that writes ``OUT`` keeps its resumable state beside it, in ``OUT.resume/``
(`resume_dir`): ``state.safetensors`` + ``state.json`` in the format of `utils.checkpoint`, swapped
in as a whole at each save. Beside, not inside: the segmenter's ``OUT`` is replaced as a whole when
the run ends, and every output folder (a model, a backbone, a transformers checkpoint) stays exactly
the product, ready to publish or copy without optimizer moments in it.

What must match. A state is resumed only by the run that wrote it: the same data (by content where
the loop holds it: image, mask and report files, pretraining images, the starting weights; by name
and path where it streams a corpus), the same settings that change the result, and the same number
of processes. Each loop describes its run as a JSON record (`ResumeState.run`); the record is
saved with the state and compared field by field. The only setting left out is the length of the
run where the loop's schedule does not depend on it (the segmenter's epochs, the backbone's epochs
and step cap; the text loop's learning-rate schedule does depend on its step count, so it must
match), so a finished or killed run can be extended. How often a state is saved never matters.

Otherwise. A state of another run, or one that cannot be read (truncated, corrupt, incomplete), is
discarded with a warning that names what differs, and the run starts over; ``resume=False`` starts
over without looking. Why this rule and not an error: the state is never mixed into a different run
(a resume on other labels or settings would silently train something nobody asked for), and the
unattended caller, the server, whose labels change between two runs by design, needs no special
case; an error would leave the next training job stuck behind a folder nobody sees. The warning
says which fields changed, so a user who changed a setting by mistake learns it at once. A state
that matches but does not fit the model (a library change) raises CheckpointError: nothing is
loaded half-way.

When it ends. The segmenter and the text loop remove the state once their output is written; the
backbone loop keeps it, so a later call with more steps continues the same run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fasttextdiff.training.engine import Engine
from fasttextdiff.utils.checkpoint import load_training_state
from fasttextdiff.utils.errors import CheckpointError

__all__ = ["RESUME_SUFFIX", "ResumeState", "digest", "resume_dir", "tensor_digest"]

RESUME_SUFFIX = ".resume"
STATE_FORMAT = 1  # bump when what a loop saves changes: older states are then discarded, not misread


def resume_dir(out_dir: str | Path) -> Path:
    """Where the run writing ``out_dir`` keeps its resumable state: ``<out_dir>.resume/`` beside it."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + RESUME_SUFFIX)


def digest(value: Any) -> str:
    """sha256 of a JSON-able value (keys sorted): how data lists enter a run record."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over tensors' shapes, dtypes and bytes (images held in memory, starting weights)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer, not a copy
    return h.hexdigest()


def differing(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """The dotted names of the fields where two run records differ."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(wanted), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved or key not in wanted:
                out.append(name)
            else:
                out += differing(saved[key], wanted[key], name)
        return out
    return [] if saved == wanted else [prefix or "record"]


class ResumeState:
    """One run's resumable state under the policy above: load (or discard), save, finish.

    ``run`` describes the run (data digests and settings; JSON-able). ``logger`` is the loop's own,
    so its lines read as the loop's: ``resuming training from epoch N``.
    """

    def __init__(self, engine: Engine, out_dir: str | Path, run: dict[str, Any], logger: logging.Logger):
        self.engine, self.logger = engine, logger
        self.dir = resume_dir(out_dir)
        self.run = json.loads(json.dumps(dict(run, processes=engine.num_processes, format=STATE_FORMAT),
                                         default=str))

    def load(self, resume: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, meta) of this run's saved state; None when there is none or it was discarded."""
        if not resume:
            if self.dir.exists():
                self._discard("starting over without resuming, as asked: removing the resume state in %s", self.dir)
            return None
        try:
            loaded = load_training_state(self.dir)
        except CheckpointError as exc:
            self._discard("ignoring unreadable resume state in %s (%s); starting over", self.dir, exc)
            return None
        if loaded is None:
            return None
        tensors, meta = loaded
        changed = differing(meta.get("run"), self.run)
        if changed:
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            self._discard("discarding the resume state in %s: it was saved by a run on other data or settings "
                          "(differing: %s); starting over", self.dir, shown)
            return None
        return tensors, meta

    def does_not_fit(self, exc: Exception) -> CheckpointError:
        """The error for a state of this very run that the model cannot take (raise it)."""
        return CheckpointError(f"the resume state in {self.dir} does not fit this model ({exc}); delete it or "
                               "start over without resuming (resume=False, --no-resume)")

    def resumed(self, epoch: int, step: int | None = None) -> None:
        """The one log line of a resume (`epoch`: epochs completed, or the epoch in progress)."""
        if self.engine.is_main:
            where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
            self.logger.info("resuming training from %s (%s)", where, self.dir)

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
             generators: dict[str, torch.Generator] | None = None) -> None:
        """This run's state (``meta`` gets the run record); every process takes part, the main one writes."""
        self.engine.save_state(self.dir, tensors, dict(meta, run=self.run), generators)

    def finish(self) -> None:
        """The run's output is written: its state is no longer needed."""
        self.engine.wait()
        if self.engine.is_main:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.engine.wait()

    def _discard(self, message: str, *args: Any) -> None:
        if self.engine.is_main:
            self.logger.warning(message, *args)
        self.engine.wait()
        if self.engine.is_main:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.engine.wait()

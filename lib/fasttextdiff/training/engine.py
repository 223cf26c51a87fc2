"""The training engine: one accelerate skeleton shared by backbone, segmenter and text pretraining.

The loops keep their maths (what is sampled, the loss, the optimiser); where and how they run is
decided here, the way diffusers' training examples do it. An ``accelerate.Accelerator`` picks the
device and joins the process group that ``accelerate launch`` (or torchrun) prepared; the loops
``prepare`` model, optimiser and data loader (DDP and sharding on several processes), run forward
passes in ``autocast`` (mixed precision, with a loss scaler for fp16), step inside ``accumulate``,
reduce and gather their metrics across processes, and write only from the main process. The
resumable state is the one safetensors + JSON format of ``checkpoint``, holding every process's
RNG states as tensors. On one CPU process the loops compute bit for bit what they did before.

What every loop shows and logs is decided here too (`RunProgress`): one tqdm bar counting optimizer
steps, and the same fields in the bar, in the records handed to a loop's ``log`` callback and in the
one log line per epoch: epoch (of epochs_total), loss, lr, seconds, and the validation figures where
the loop has them. Where a loop resumes from, and when it may, is `training.resume`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from fasttextdiff.utils.checkpoint import save_training_state
from fasttextdiff.utils.devices import resolve_device

__all__ = ["Engine", "RunProgress", "default_mixed_precision", "set_seed"]


def _launched() -> bool:
    """Whether this process is one of several that a launcher started (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or torch.distributed.is_initialized()


def default_mixed_precision(device: torch.device) -> str:
    """What ``mixed_precision="auto"`` means: the launcher's choice (``accelerate launch --mixed_precision``)
    when there is one, else bf16 on GPUs that have it, fp16 (with loss scaling) on older ones, none on CPUs."""
    if device.type != "cuda":
        return "no"
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _fresh_accelerate_state(cpu: bool) -> None:
    """accelerate keeps one state per process, fixed by its first Accelerator; a later run in the same
    process (the tests, the server's default-model build) may want another device or precision. A
    launched run keeps its process group; a lone process starts over completely."""
    if not PartialState._shared_state:
        return
    AcceleratorState._reset_state(reset_partial_state=not _launched())
    GradientState._reset_state()


class Engine:
    """One training run's accelerate context plus the helpers all three loops share."""

    def __init__(self, device: Any = None, mixed_precision: str = "auto", gradient_accumulation_steps: int = 1):
        wanted = resolve_device(device)
        cpu = wanted.type == "cpu"
        _fresh_accelerate_state(cpu)
        if not cpu and wanted.index is not None and not _launched():
            torch.cuda.set_device(wanted)  # a lone process on an explicitly chosen GPU
        precision = default_mixed_precision(wanted) if mixed_precision == "auto" or cpu else mixed_precision
        acc = self.accelerator = Accelerator(cpu=cpu, mixed_precision=precision,
                                             gradient_accumulation_steps=gradient_accumulation_steps)
        self.device: torch.device = acc.device
        self.is_main, self.num_processes, self.process_index = (acc.is_main_process, acc.num_processes,
                                                                 acc.process_index)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def progress(self, enabled: bool, **kwargs: Any) -> tqdm:
        """A tqdm bar on the main process only."""
        return tqdm(disable=not (enabled and self.is_main), **kwargs)

    # ------------------------------------------------------------------ metrics across processes
    def mean(self, value: torch.Tensor | float) -> float:
        """A scalar averaged over processes: the same figure on every process (logs, stopping)."""
        value = torch.as_tensor(value).detach().reshape(1).to(self.device)
        return float(self.accelerator.reduce(value, "mean"))

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop request must stop all of them)."""
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), "sum") > 0)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample values of every process, without the samples the sharded loader repeated."""
        return self.accelerator.gather_for_metrics(values.to(self.device)).cpu()

    # ------------------------------------------------------------------ resumable state
    def save_state(self, directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                   generators: dict[str, torch.Generator] | None = None) -> None:
        """Every process hands in its RNG states; the main process writes the state; all wait for it."""
        states = {"torch": torch.get_rng_state(), **{n: g.get_state() for n, g in (generators or {}).items()}}
        gathered = {n: self.accelerator.gather(s.to(self.device)[None]).cpu() for n, s in states.items()}
        if self.is_main:
            tensors = dict(tensors)
            for name, per_process in gathered.items():
                tensors.update({f"rng.{name}.{rank}": s for rank, s in enumerate(per_process)})
            save_training_state(Path(directory), tensors, dict(meta, num_processes=self.num_processes))
        self.wait()

    def restore_rng(self, tensors: dict[str, torch.Tensor],
                    generators: dict[str, torch.Generator] | None = None) -> None:
        """This process's RNG states from a saved state (KeyError when the state holds none for it)."""
        torch.set_rng_state(tensors[f"rng.torch.{self.process_index}"])
        for name, generator in (generators or {}).items():
            generator.set_state(tensors[f"rng.{name}.{self.process_index}"])


class RunProgress:
    """The bar and the per-epoch fields every training loop shares.

    The bar counts optimizer steps (``total_steps``, from ``initial_step`` after a resume); its postfix
    shows ``epoch i/N``, ``loss``, ``lr`` and ``val_dice`` where there is one. `record` builds the dict
    a loop hands to its ``log`` callback: ``epoch`` (1-based: the epoch in progress, or just ended),
    ``epochs_total`` (None when the loop cannot know it), ``loss``, ``lr``, ``seconds`` (since this
    process started the run) plus the loop's own fields (``step``/``total_steps``, ``val_dice``...).
    `end_epoch` writes the one log line per epoch, the same in every loop.
    """

    def __init__(self, engine: Engine, *, desc: str, enabled: bool, total_steps: int, initial_step: int = 0,
                 epochs_total: int | None, logger: logging.Logger):
        self.engine, self.logger, self.epochs_total = engine, logger, epochs_total
        self.started = time.perf_counter()
        self.bar = engine.progress(enabled, total=total_steps, initial=initial_step, desc=desc, unit="step")

    def record(self, epoch: int, loss: float, lr: float, **fields: Any) -> dict[str, Any]:
        return {"epoch": epoch, "epochs_total": self.epochs_total, "loss": loss, "lr": lr,
                "seconds": round(time.perf_counter() - self.started, 2), **fields}

    def step(self, record: dict[str, Any], n: int = 1) -> None:
        self.bar.update(n)
        self.bar.set_postfix(self._postfix(record), refresh=False)

    def end_epoch(self, record: dict[str, Any]) -> None:
        self.bar.set_postfix(self._postfix(record))
        if not self.engine.is_main:
            return
        val = "".join(f", {k} {v:.4f}" for k, v in record.items()
                      if k.startswith("val_") and isinstance(v, float) and math.isfinite(v))
        self.logger.info("epoch %s/%s: loss %.4f, lr %.3g, %.1f s%s", record["epoch"], self.epochs_total or "?",
                         record["loss"], record["lr"], record["seconds"], val)

    def close(self) -> None:
        self.bar.close()

    def _postfix(self, record: dict[str, Any]) -> dict[str, str]:
        post = {"epoch": f"{record['epoch']}/{self.epochs_total or '?'}", "loss": f"{record['loss']:.4f}",
                "lr": f"{record['lr']:.2e}"}
        if isinstance(record.get("val_dice"), float):
            post["val_dice"] = f"{record['val_dice']:.4f}"
        return post

"""The one resume policy and the one set of log fields, checked the same way on the three training loops.

Each loop is interrupted right after it saved a state; then the same run resumes, a run with another
setting discards the state, an unreadable state is discarded, and ``resume=False`` starts over - the
same log lines, the same folder (``<out>.resume/``) and the same record fields in every loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fasttextdiff.training.resume import RESUME_SUFFIX, resume_dir

COMMON_FIELDS = {"epoch", "epochs_total", "loss", "lr", "seconds"}
TEXT_TINY = dict(max_seq_len=64, batch_size=8, hidden=32, layers=2, heads=2, vocab_size=600, max_notes=400,
                 max_eval_blocks=8, tokenizer="wordpiece")


class Interrupt(Exception):
    pass


@dataclass
class Loop:
    name: str
    logger: str
    counter: str  # what a log record counts: "epoch" (segmenter) or "step"
    saved_at: int  # the counter value of the state saved before the interrupt
    other_setting: str  # a setting whose change makes a different run
    start: Callable[..., dict]  # (out, log, resume, **changes) -> metrics


def _segmenter(request) -> Callable[..., dict]:
    from fasttextdiff.config import FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.training.segmenter import train_segmenter
    from fasttextdiff.training.workflows import load_lvit

    data, backbone = request.getfixturevalue("tiny_dataset"), request.getfixturevalue("tiny_backbone")
    splits = load_lvit(data)

    def start(out, log=None, resume=True, **changes):
        cfg = TrainConfig(**{"epochs": 3, "batch_size": 4, "lr": 1e-3, "text_fallback": False, **changes})
        return train_segmenter(splits["train"], out, backbone_dir=backbone, text_config=TextConfig(encoder="tiny"),
                               segmenter_config=SegmenterConfig(head_channels=8, fusion=FusionConfig(dim=16, heads=2)),
                               train_config=cfg, val_samples=splits["val"], progress=False, log=log, resume=resume)
    return start


def _backbone(request) -> Callable[..., dict]:
    from fasttextdiff.config import BackboneConfig
    from fasttextdiff.training.backbone import pretrain_backbone

    config = BackboneConfig(image_size=32, block_out_channels=(8, 16), timesteps=(50, 150), layers_per_block=1)
    images = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def start(out, log=None, resume=True, **changes):
        options = {"epochs": 2, "batch_size": 4, "lr": 1e-3, **changes}
        return pretrain_backbone(images, config, out, checkpoint_every=1, progress=False, log=log, resume=resume,
                                 **options)
    return start


def _text(request) -> Callable[..., dict]:
    from fasttextdiff.training.text_mlm import pretrain_text

    def start(out, log=None, resume=True, **changes):
        options = {**TEXT_TINY, "steps": 4, "lr": 5e-3, **changes}
        return pretrain_text("iu-xray", None, "tiny", out, checkpoint_every=2, progress=False, log=log, resume=resume,
                             **options)
    return start


LOOPS = {
    "segmenter": (_segmenter, dict(logger="fasttextdiff.training.segmenter", counter="epoch", saved_at=1,
                                   other_setting="lr")),
    "backbone": (_backbone, dict(logger="fasttextdiff.training.backbone", counter="step", saved_at=1,
                                 other_setting="lr")),
    "text-mlm": (_text, dict(logger="fasttextdiff.training.text_mlm", counter="step", saved_at=2,
                             other_setting="lr")),
}


@pytest.fixture(params=sorted(LOOPS))
def loop(request) -> Loop:
    build, spec = LOOPS[request.param]
    return Loop(name=request.param, start=build(request), **spec)


def _interrupted(loop: Loop, out: Path, **changes) -> None:
    """Run until the record after the first saved state, then raise (a kill between two saves)."""
    def log(record):
        if record[loop.counter] == loop.saved_at + 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        loop.start(out, log=log, **changes)
    state = json.loads((resume_dir(out) / "state.json").read_text(encoding="utf-8"))
    assert state[loop.counter] == loop.saved_at


def _run(loop: Loop, out: Path, caplog, **kwargs) -> tuple[dict, list[dict]]:
    records: list[dict] = []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=loop.logger):
        metrics = loop.start(out, log=records.append, **kwargs)
    return metrics, records


def test_every_loop_keeps_its_state_beside_its_output_and_resumes_the_same_run(loop, tmp_path, caplog):
    out = tmp_path / "out"
    _interrupted(loop, out)
    assert resume_dir(out) == tmp_path / f"out{RESUME_SUFFIX}" and resume_dir(out).is_dir()
    assert not (out / "checkpoint").exists()  # never inside the output folder

    metrics, records = _run(loop, out, caplog)
    assert "resuming training from epoch" in caplog.text and "discarding" not in caplog.text
    assert records[0][loop.counter] == loop.saved_at + 1  # continued, not restarted
    assert metrics
    for record in records:  # the same fields in every loop's records
        assert COMMON_FIELDS <= set(record), record
        assert isinstance(record["seconds"], float) and record["lr"] >= 0 and record["epoch"] >= 1
    # one line per epoch with the same fields in every loop
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert epoch_lines and all(("loss" in m and "lr" in m and m.endswith(" s") or " s, val_" in m)
                               for m in epoch_lines), epoch_lines


def test_every_loop_discards_the_state_of_another_run_and_says_what_differs(loop, tmp_path, caplog):
    out = tmp_path / "out"
    _interrupted(loop, out)
    _, records = _run(loop, out, caplog, **{loop.other_setting: 2e-3})
    assert "discarding the resume state" in caplog.text and loop.other_setting in caplog.text
    assert "resuming" not in caplog.text
    assert records[0][loop.counter] == 1  # started over


def test_every_loop_discards_an_unreadable_state_and_starts_over(loop, tmp_path, caplog):
    out = tmp_path / "out"
    _interrupted(loop, out)
    weights = resume_dir(out) / "state.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _, records = _run(loop, out, caplog)
    assert "ignoring unreadable resume state" in caplog.text and "resuming" not in caplog.text
    assert records[0][loop.counter] == 1


def test_every_loop_starts_over_when_told_not_to_resume(loop, tmp_path, caplog):
    out = tmp_path / "out"
    _interrupted(loop, out)
    _, records = _run(loop, out, caplog, resume=False)
    assert "starting over without resuming" in caplog.text and "resuming training" not in caplog.text
    assert records[0][loop.counter] == 1

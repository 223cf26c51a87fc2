"""Publishing: a `current` link swapped atomically, old versions pruned, directories replaced whole."""

from __future__ import annotations

import pytest
import torch

from fasttextdiff.utils.atomic import publish, replace_dir, resolve_model_dir, staging_dir
from fasttextdiff.utils.checkpoint import (load_optimizer_state, load_training_state, optimizer_state_tensors,
                                     save_training_state)
from fasttextdiff.utils.errors import CheckpointError


def _version(tmp_path, root, text):
    staging = staging_dir(root / "x")
    (staging / "weights.txt").write_text(text)
    return publish(staging, root, keep=2)


def test_publish_swaps_current_and_prunes(tmp_path):
    root = tmp_path / "models"
    first = _version(tmp_path, root, "1")
    assert resolve_model_dir(root) == first.resolve()
    assert (resolve_model_dir(root) / "weights.txt").read_text(encoding="utf-8") == "1"
    _version(tmp_path, root, "2")
    third = _version(tmp_path, root, "3")
    assert (resolve_model_dir(root) / "weights.txt").read_text(encoding="utf-8") == "3"
    assert resolve_model_dir(root) == third.resolve()
    assert len(list((root / "versions").iterdir())) == 2 and not first.exists()
    assert resolve_model_dir(tmp_path / "plain") == tmp_path / "plain"  # not a root: the path itself


def test_replace_dir_swaps_a_whole_directory(tmp_path):
    target = tmp_path / "model"
    for text in ("old", "new"):
        staging = staging_dir(target)
        (staging / "f").write_text(text)
        replace_dir(staging, target)
    assert (target / "f").read_text(encoding="utf-8") == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or old copies left


def test_optimizer_state_round_trips_without_pickle():
    param = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([param], lr=0.1)
    param.sum().backward()
    opt.step()
    tensors, meta = optimizer_state_tensors(opt)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    fresh = torch.optim.Adam([param], lr=0.5)
    load_optimizer_state(fresh, tensors, meta)
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.1)
    torch.testing.assert_close(fresh.state[param]["exp_avg"], opt.state[param]["exp_avg"])


def test_training_state_is_whole_and_checksummed(tmp_path):
    tensors = {"model.w": torch.arange(6.0), "rng.torch.0": torch.get_rng_state()}
    for step in (1, 2):
        save_training_state(tmp_path / "ckpt", tensors, {"step": step})
    loaded, meta = load_training_state(tmp_path / "ckpt")
    assert meta["step"] == 2 and torch.equal(loaded["model.w"], tensors["model.w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging or old copies left
    path = tmp_path / "ckpt" / "state.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: the header still reads
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_training_state(tmp_path / "ckpt")
    assert load_training_state(tmp_path / "none") is None

"""Inference precision: one switch (FASTTEXTDIFF_PRECISION, or an explicit option that wins over it), and what
reduced precision may change, with tolerances from the dtype's own epsilon, checked where it matters.

Forced bf16 and fp16 run on every CPU (torch's CPU autocast emulates them where the hardware lacks them), so
these tests run everywhere; one runs in a child process with oneDNN capped at AVX2 to take the emulated path
on a machine that has bf16 natively. The paths-agree tests (test_fast_inference.py) pin fp32 instead.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig
from fasttextdiff.inference.batched import (PRECISION_ENV, InferenceOptions, precision_from_env, precision_record,
                                         predict_slices, resolve_precision)

CPU = torch.device("cpu")
REDUCED = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A softmax probability through a few conv/attention layers: each rounds at ~eps/2 relative; a handful of eps
# bounds the sum. Probabilities are in [0, 1], so the tolerance is absolute.
PROBABILITY_EPS = 8
# Per-image mean uncertainty (what active learning ranks by) moves by at most this many eps of the largest one.
RANKING_EPS = 8


def eps(precision: str) -> float:
    return torch.finfo(REDUCED[precision]).eps


# ---------------------------------------------------------------------------------------------- the switch
def test_the_variable_sets_the_default_and_an_explicit_precision_wins(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert precision_from_env() == "auto" and InferenceOptions().precision == "auto"
    monkeypatch.setenv(PRECISION_ENV, "")
    assert InferenceOptions().precision == "auto"
    monkeypatch.setenv(PRECISION_ENV, " BF16 ")
    assert precision_from_env() == "bf16" and InferenceOptions().precision == "bf16"
    assert InferenceOptions(precision="fp32").precision == "fp32"  # code wins over the variable
    assert InferenceOptions.reference().precision == "fp32"
    assert InferenceOptions().but(uncertainty="softmax").precision == "bf16"
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert precision_record(None, "cpu")["compute_dtype"] == "fp32"


@pytest.mark.parametrize("value", ["int8", "float32", "half"])
def test_a_bad_value_names_the_variable_and_the_choices(monkeypatch, value):
    monkeypatch.setenv(PRECISION_ENV, value)
    with pytest.raises(ValueError, match=rf"{PRECISION_ENV}.*auto, fp32, bf16, fp16.*{value}"):
        InferenceOptions()
    with pytest.raises(ValueError, match=PRECISION_ENV):
        precision_record(None, "cpu")


def test_forced_reduced_precision_resolves_on_any_cpu_and_auto_only_where_native():
    assert resolve_precision("bf16", CPU) is torch.bfloat16  # emulated where the CPU lacks it
    assert resolve_precision("fp16", CPU) is torch.float16  # torch's CPU autocast has fp16 (emulated off AVX512-FP16)
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto", CPU) is (torch.bfloat16 if native else None)
    record = precision_record("bf16", CPU)
    assert record["precision"] == "bf16" and record["compute_dtype"] == "bf16" and record["device"] == "cpu"
    assert record["native"] is bool(native)
    assert precision_record("fp32", CPU)["native"] is True


def test_the_segmenter_reports_what_it_computes_in(monkeypatch, tiny_model):
    from fasttextdiff.inference.pipeline import Segmenter

    monkeypatch.setenv(PRECISION_ENV, "bf16")
    seg = Segmenter.load(tiny_model, device="cpu", n_noise=1)
    assert seg.options.precision == "bf16"
    assert seg.inference_settings == precision_record("bf16",
                                                      "cpu") and seg.inference_settings["precision_env"] == "bf16"
    pinned = Segmenter.load(tiny_model, device="cpu", n_noise=1, options=InferenceOptions(precision="fp32"))
    assert pinned.inference_settings["compute_dtype"] == "fp32"


def test_cli_precision_flag_wins_over_the_variable(monkeypatch, tiny_model, tiny_dataset, tmp_path, capsys):
    from fasttextdiff.commands.main import main

    image = sorted((tiny_dataset / "Test_Folder" / "img").iterdir())[0]
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    args = ["segment", str(image), "--report", "a lesion", "--model", str(tiny_model), "--out",
            str(tmp_path / "m.png"),
            "--n-noise", "1", "--device", "cpu"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["inference"]["compute_dtype"] == "bf16"
    assert main(args + ["--precision", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["inference"]["compute_dtype"] == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "double")
    assert main(args) == 2
    assert PRECISION_ENV in capsys.readouterr().err


# ------------------------------------------------------------------------------- what reduced precision changes
@pytest.fixture(scope="module")
def random_model(untrained_tiny_model):
    return untrained_tiny_model


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_forced_reduced_precision_stays_within_its_epsilon(random_model, precision):
    model, states, mask = random_model
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    ref_p, ref_u = predict_slices(model, x, states, mask, 3, InferenceOptions(precision="fp32"), CPU)
    p, u = predict_slices(model, x, states, mask, 3, InferenceOptions(precision=precision), CPU)
    assert p.dtype == u.dtype == torch.float32 and torch.isfinite(p).all() and torch.isfinite(u).all()
    tol = PROBABILITY_EPS * eps(precision)
    torch.testing.assert_close(p, ref_p, atol=tol, rtol=0)
    torch.testing.assert_close(u, ref_u, atol=tol, rtol=0)
    assert not torch.equal(p, ref_p)  # it really ran in reduced precision


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small real model that segments something (the session's tiny model predicts no foreground, so a
    Dice against it would say nothing): the same builders as conftest's, 64 px, 60 epochs, ~10 s."""
    from fasttextdiff.config import TextConfig, TrainConfig
    from fasttextdiff.data.io import read_image
    from fasttextdiff.data.synthetic import make_lvit_dataset
    from fasttextdiff.training.segmenter import train_segmenter
    from fasttextdiff.training.workflows import load_lvit, lvit_image_paths, pretrain_backbone_on_files

    root = tmp_path_factory.mktemp("precision")
    data = make_lvit_dataset(root / "synth", variant="standard", n_train=8, n_val=4, n_test=4, size=64, seed=0)
    pretrain_backbone_on_files(lvit_image_paths(data), BackboneConfig(image_size=64, block_out_channels=(8, 16),
                                                                      timesteps=(50, 150)),
                               root / "backbone", epochs=1, max_steps=3, batch_size=4, progress=False, resume=False)
    splits = load_lvit(data)
    train_segmenter(splits["train"], root / "model", backbone_dir=root / "backbone",
                    text_config=TextConfig(encoder="tiny"),
                    segmenter_config=SegmenterConfig(head_channels=8, fusion=FusionConfig(dim=16, heads=2)),
                    train_config=TrainConfig(epochs=60, batch_size=4, lr=1e-2), progress=False)
    samples = splits["train"] + splits["val"] + splits["test"]
    return root / "model", [(read_image(s.image), s.text) for s in samples]


def _segment_all(model_dir: Path, cases, precision: str) -> list:
    from fasttextdiff.inference.pipeline import Segmenter

    seg = Segmenter.load(model_dir, device="cpu", n_noise=4, options=InferenceOptions(precision=precision))
    return [seg.segment(image, text) for image, text in cases]


@pytest.fixture(scope="module")
def fp32_results(trained):
    return _segment_all(*trained, "fp32")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_keeps_the_mask_and_the_uncertainty_ranking(trained, fp32_results, precision):
    from scipy.stats import spearmanr

    results = _segment_all(*trained, precision)
    ref = np.stack([r.mask for r in fp32_results]) > 0
    got = np.stack([r.mask for r in results]) > 0
    assert ref.sum() > 0.01 * ref.size, "the model must segment something for a Dice to mean anything"
    dice = 2 * (ref & got).sum() / (ref.sum() + got.sum())
    assert dice >= 0.99, (precision, dice)
    worst = max(float(np.abs(r.probabilities - q.probabilities).max()) for r, q in zip(fp32_results, results))
    assert worst <= 2 * PROBABILITY_EPS * eps(precision), (precision, worst)  # trained weights amplify more

    a = np.array([r.summary["uncertainty_mean"] for r in fp32_results])
    b = np.array([r.summary["uncertainty_mean"] for r in results])
    shift = RANKING_EPS * eps(precision) * a.max()
    assert np.abs(b - a).max() <= shift, (precision, np.abs(b - a).max(), shift)
    assert spearmanr(a, b).statistic >= 0.9  # the active-learning bar (bench/speed.py RANK_AGREEMENT_MIN)
    assert a[b.argmax()] >= a.max() - 2 * shift  # the image picked next is the fp32 pick or ties with it


def test_forced_bf16_runs_where_the_cpu_has_no_bf16():
    """A child process with oneDNN capped at AVX2 (no AVX512-BF16/AMX): `auto` stays fp32, forced bf16 is
    emulated and gives the bf16 numbers, within bf16's epsilon of fp32."""
    script = textwrap.dedent("""
        import json, torch
        from fasttextdiff.models.backbone import DiffusionBackbone
        from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig
        from fasttextdiff.inference.batched import InferenceOptions, precision_record, predict_slices
        from fasttextdiff.models.segmenter import FastTextDiffModel
        torch.manual_seed(0)
        torch.set_num_threads(1)
        backbone = DiffusionBackbone(BackboneConfig(image_size=32, block_out_channels=(8, 16), timesteps=(50, 150)))
        model = FastTextDiffModel(backbone, 16, SegmenterConfig(fusion=FusionConfig(dim=16, heads=2))).eval()
        states, mask, x = torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool), torch.rand(2, 1, 32, 32) * 2 - 1
        cpu = torch.device("cpu")
        ref, _ = predict_slices(model, x, states, mask, 2, InferenceOptions(precision="fp32"), cpu)
        got, _ = predict_slices(model, x, states, mask, 2, InferenceOptions(), cpu)  # from the variable
        print(json.dumps({"forced": precision_record(None, cpu), "auto": precision_record("auto", cpu),
                          "diff": float((got - ref).abs().max()), "equal": bool(torch.equal(got, ref))}))
    """)
    lib = Path(__file__).resolve().parents[2] / "lib"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", PRECISION_ENV: "bf16",
           "PYTHONPATH": os.pathsep.join([str(lib), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["forced"]["precision"] == "bf16" and result["forced"]["compute_dtype"] == "bf16"
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert result["forced"]["native"] is False and result["auto"]["compute_dtype"] == "fp32"
    assert not result["equal"] and result["diff"] <= PROBABILITY_EPS * eps("bf16")

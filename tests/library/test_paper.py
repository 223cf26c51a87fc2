"""The paper's backbone and runs on a tiny ADM laid out like 256x256_diffusion_uncond: taps inside the
up-blocks, `train --preset`, and `fasttextdiff reproduce` end to end on an LViT-layout dataset.

The tiny ADM has the 256 px model's structure at 32 px (six levels, two res blocks, attention at the
three coarsest, resnet up/down-sampling, scale-shift norm), so the paper's output_blocks 4..16 exist
and land in the same modules, at 1/8 of the sizes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from test_adm_convert import adm_keys, random_state, run_cli

from fasttextdiff.conversion.adm import parse_adm_flags
from fasttextdiff.models.backbone import load_backbone
from fasttextdiff.commands.main import build_parser, train_settings
from fasttextdiff.models.segmenter import FastTextDiffModel

PAPER_LAYOUT = ("--image_size 32 --num_channels 32 --channel_mult 1,1,2,2,2,2 --num_res_blocks 2 "
                "--attention_resolutions 4,2,1 --num_head_channels 32 --resblock_updown True "
                "--use_scale_shift_norm True --learn_sigma True")
TINY_HEAD = ["--fusion-dim", "16", "--heads", "2", "--head-channels", "8", "--batch-size", "4", "--device", "cpu"]
REPORT = "Unilateral pulmonary infection, one infected area, upper left lung."


@pytest.fixture(scope="module")
def paper_adm(tmp_path_factory) -> Path:
    """A converted tiny ADM backbone with the converter's defaults (the paper's QaTa taps 4,6,8,12)."""
    root = tmp_path_factory.mktemp("paper-adm")
    checkpoint = root / "adm.pt"
    torch.save(random_state(adm_keys(parse_adm_flags(PAPER_LAYOUT)), seed=3), checkpoint)
    from fasttextdiff.commands.main import main

    assert main(["convert-backbone", str(checkpoint), "--adm-flags", PAPER_LAYOUT, "--out",
                 str(root / "backbone")]) == 0
    return root / "backbone"


def test_converter_writes_the_paper_taps_and_the_backbone_hooks_those_modules(paper_adm):
    backbone = load_backbone(paper_adm).freeze()
    assert backbone.config.feature_taps == (4, 6, 8, 12) and backbone.config.feature_blocks == ()
    assert backbone.config.timesteps == (50, 150, 250)
    assert backbone.feature_modules == ["up_blocks.1.attentions.1", "up_blocks.2.attentions.0",
                                        "up_blocks.2.upsamplers.0", "up_blocks.4.resnets.0"]
    assert backbone.feature_channels == [64 * 3, 64 * 3, 64 * 3, 32 * 3]
    assert backbone.feature_sizes == [2, 4, 8, 16]  # the 256 px model's 16, 32, 64, 128 at 1/8

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reached = []  # the forward stops at the last tap: nothing after up-block 4's first resnet runs
    handle = backbone.unet.up_blocks[5].register_forward_pre_hook(lambda *_: reached.append("up_blocks.5"))
    feats = backbone.features(x)
    handle.remove()
    assert reached == []
    assert [tuple(f.shape) for f in feats] == [(2, 192, 2, 2), (2, 192, 4, 4), (2, 192, 8, 8), (2, 96, 16, 16)]

    # the same values as those modules give in a full forward of the noised batch (timestep-major)
    seen = {}
    hooks = [backbone.unet.get_submodule(m).register_forward_hook(lambda _m, _i, o, m=m: seen.__setitem__(m, o))
             for m in backbone.feature_modules]
    steps = torch.tensor([50, 150, 250]).repeat_interleave(2)
    noisy = backbone.scheduler.add_noise(x.repeat(3, 1, 1, 1), backbone.noise(x).repeat(3, 1, 1, 1), steps)
    with torch.no_grad():
        backbone.unet(noisy, steps)
    for h in hooks:
        h.remove()
    for f, module in zip(feats, backbone.feature_modules):
        full = seen[module]
        c, s = full.shape[1], full.shape[-1]
        torch.testing.assert_close(f, full.reshape(3, 2, c, s, s).transpose(0, 1).reshape(2, 3 * c, s, s))


def test_monuseg_taps_reach_the_finest_level_and_old_block_taps_still_work(paper_adm):
    backbone = load_backbone(paper_adm)
    monuseg = backbone.reconfigured(feature_taps=(6, 8, 12, 16), timesteps=(50,)).freeze()
    assert monuseg.feature_modules[-1] == "up_blocks.5.resnets.1"
    feats = monuseg.features(torch.zeros(1, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 4, 4), (1, 64, 8, 8), (1, 32, 16, 16), (1, 32, 32, 32)]
    blocks = backbone.reconfigured(feature_blocks=(4, 5)).freeze()  # whole up-blocks, as old configs say
    assert blocks.config.feature_taps == () and blocks.feature_modules == ["up_blocks.4", "up_blocks.5"]
    assert [tuple(f.shape) for f in blocks.features(torch.zeros(1, 3, 32, 32))] == [(1, 96, 32, 32), (1, 96, 32, 32)]
    with pytest.raises(ValueError, match="not an output block"):
        backbone.reconfigured(feature_taps=(18,))
    with pytest.raises(ValueError, match="can change on a trained backbone"):
        backbone.reconfigured(block_out_channels=(32,))


def test_taps_work_on_our_own_unets_too():
    """feature_taps is not ADM-only: any diffusers UNet2DModel laid out in levels of resnets (+ attention)."""
    from fasttextdiff.models.backbone import DiffusionBackbone
    from fasttextdiff.config import BackboneConfig

    backbone = DiffusionBackbone(BackboneConfig(image_size=32, block_out_channels=(8, 16), attention=True,
                                                timesteps=(50, 150), feature_taps=(0, 1, 3))).freeze()
    assert backbone.feature_modules == ["up_blocks.0.attentions.0", "up_blocks.0.upsamplers.0",
                                        "up_blocks.1.attentions.1"]
    feats = backbone.features(torch.zeros(2, 1, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 16), (2, 32, 32, 32), (2, 16, 32, 32)]
    with pytest.raises(ValueError, match="not both"):
        BackboneConfig(feature_taps=(1,), feature_blocks=(0,))


def _parse(*extra: str):
    return build_parser().parse_args(["train", "--data", "d", "--backbone", "b", "--out", "o", *extra])


@pytest.mark.parametrize("preset, taps, epochs",
                         [("paper-qata", (4, 6, 8, 12), 50), ("paper-mosmed", (4, 6, 8, 12), 100),
                                                  ("paper-monuseg", (6, 8, 12, 16), 50)])
def test_presets_set_the_reference_recipe(preset, taps, epochs):
    train, overrides = train_settings(_parse("--preset", preset))
    assert (train.epochs, train.lr, train.weight_decay) == (epochs, 1e-4, 0.0)
    assert overrides == {"feature_taps": taps, "timesteps": (50, 150, 250), "image_size": 256}


def test_explicit_flags_beat_the_preset_and_no_preset_keeps_the_defaults():
    train, overrides = train_settings(_parse("--preset", "paper-qata", "--epochs", "3", "--taps", "6,8",
                                             "--image-size", "64", "--lr", "0.01"))
    assert (train.epochs, train.lr) == (3, 0.01)
    assert overrides == {"feature_taps": (6, 8), "timesteps": (50, 150, 250), "image_size": 64}
    train, overrides = train_settings(_parse())
    assert (train.epochs, train.lr, overrides) == (50, 1e-3, {})
    assert _parse("--text-max-tokens", "10").max_text_tokens == 10  # the reference's truncation
    assert _parse("--max-text-tokens", "12").max_text_tokens == 12  # the older spelling still works


def test_text_max_tokens_10_keeps_ten_tokens_as_the_reference_tokenizer_does():
    """max_length counts the special tokens, as transformers' truncation=True, max_length=10 does."""
    from fasttextdiff.config import TextConfig
    from fasttextdiff.text.encoder import TextEncoder

    args = _parse("--text-max-tokens", "10")
    encoder = TextEncoder(TextConfig(encoder=args.text_encoder, max_length=args.max_text_tokens))
    batch = encoder.encode([REPORT * 5, "Left lung."])
    assert batch.mask.sum(1).tolist()[0] == 10
    ids = encoder.tokenizer(REPORT * 5, truncation=True, max_length=10)["input_ids"]
    assert len(ids) == 10 and batch.mask.sum(1).tolist()[1] < 10


def test_train_with_a_preset_on_the_converted_adm_then_segment(tmp_path, paper_adm, tiny_dataset, capsys):
    model = tmp_path / "model"
    code, _, err = run_cli(capsys, "train", "--data", tiny_dataset, "--backbone", paper_adm, "--out", model,
                           "--preset", "paper-monuseg", "--image-size", "32", "--epochs", "1",
                           "--text-max-tokens", "10", *TINY_HEAD)
    assert code == 0, err
    record = json.loads((model / "fasttextdiff.json").read_text(encoding="utf-8"))
    assert record["backbone"]["feature_taps"] == [6, 8, 12, 16] and record["backbone"]["image_size"] == 32
    assert record["train"]["epochs"] == 1 and record["train"]["lr"] == 1e-4
    assert record["text"]["max_length"] == 10
    loaded, _ = FastTextDiffModel.load(model)
    assert loaded.backbone.feature_modules[-1] == "up_blocks.5.resnets.1"
    image = sorted((tiny_dataset / "Test_Folder" / "img").iterdir())[0]
    code, stdout, err = run_cli(capsys, "segment", image, "--report", REPORT, "--model", model,
                                "--out", tmp_path / "mask.png", "--n-noise", "1", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "mask.png").stat().st_size > 0


def test_a_hub_id_offline_says_how_to_pass_a_local_folder(tmp_path, paper_adm, tiny_dataset, capsys):
    code, _, err = run_cli(capsys, "train", "--data", tiny_dataset, "--backbone", paper_adm, "--out", tmp_path / "m",
                           "--image-size", "32", "--epochs", "1", "--text-encoder", "no-such-org/clinical-modernbert",
                           *TINY_HEAD)
    assert code == 2
    assert "no-such-org/clinical-modernbert" in err and "--text-encoder DIR" in err
    assert not (tmp_path / "m").exists()


def test_reproduce_end_to_end_then_resumes(tmp_path, paper_adm, tiny_dataset, capsys):
    out = tmp_path / "reproduce"
    argv = ["reproduce", "--dataset", "qata", "--data", tiny_dataset, "--backbone", paper_adm, "--out", out,
            "--labeled", "0.5,1", "--epochs", "2", "--image-size", "32", *TINY_HEAD]
    started = time.perf_counter()
    code, stdout, err = run_cli(capsys, *argv)
    first_run = time.perf_counter() - started
    assert code == 0, err
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [(row["labeled"], row["labeled_images"], row["test_images"]) for row in result["table"]] == [(0.5, 4, 4),
                                                                                                        (1.0, 8, 4)]
    for row in result["table"]:
        assert 0 <= row["dice"] <= 100 and 0 <= row["iou"] <= row["dice"] + 1e-9
        assert row["seconds_per_epoch"] > 0 and row["inference_ms_per_image"] > 0
    assert result["settings"]["backbone_overrides"] == {"feature_taps": [4, 6, 8, 12], "timesteps": [50, 150, 250],
                                                        "image_size": 32}
    table = (out / "results.md").read_text(encoding="utf-8")
    assert ("| LViT (published) | 100% | 83.66 | 75.11 |" in table
            and "| U-Net (published) | 100% | 79.02 | – |" in table)
    assert "| FastTextDiff (this run) | 50% (4 images) |" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights = out / "runs" / "labeled-1-seed-0" / "model" / "segmenter.safetensors"
    assert weights.is_file()
    before = weights.stat().st_mtime_ns

    started = time.perf_counter()
    code, stdout, err = run_cli(capsys, *argv)  # everything done: skipped, table rewritten
    assert code == 0, err
    assert stdout.count("done before, skipped") == 2
    assert weights.stat().st_mtime_ns == before
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["table"] == result["table"]
    assert time.perf_counter() - started < first_run
    print(f"reproduce, tiny scale: first run {first_run:.1f} s")


@pytest.mark.parametrize("extra, message", [(["--labeled", "1.5"], "fractions in (0, 1]"),
                                            (["--seeds", "0"], "--seeds must be at least 1")])
def test_reproduce_refuses_bad_settings(tmp_path, paper_adm, tiny_dataset, capsys, extra, message):
    code, _, err = run_cli(capsys, "reproduce", "--dataset", "qata", "--data", tiny_dataset, "--backbone", paper_adm,
                           "--out", tmp_path / "o", *extra)
    assert code == 2 and message in err


def test_reproduce_without_a_backbone_says_how_to_make_one(tmp_path, tiny_dataset, capsys):
    code, _, err = run_cli(capsys, "reproduce", "--dataset", "mosmed", "--data", tiny_dataset,
                           "--backbone", tmp_path / "absent", "--out", tmp_path / "o")
    assert code == 2 and "convert-backbone" in err

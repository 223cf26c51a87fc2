"""A text path that only helps: the text residual ("zero": output projection at zero; "gate": a tanh
gate at zero) starts as the no_text network, opens when the report carries information, text
dropout trains the image path on its own, and text_fallback's image-only phase is the no_text run."""

from __future__ import annotations

import json

import pytest
import torch

from fasttextdiff.models.backbone import DiffusionBackbone
from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig, TextConfig
from fasttextdiff.models.fusion import CrossModalFusion
from fasttextdiff.models.segmenter import MODEL_CONFIG_FILE, FastTextDiffModel


def _backbone() -> DiffusionBackbone:
    torch.manual_seed(0)
    return DiffusionBackbone(BackboneConfig(image_size=32, block_out_channels=(8, 16), timesteps=(50, 150)))


def _model(use_text: bool, residual: str = "zero", dropout: float = 0.0, seed: int = 1) -> FastTextDiffModel:
    backbone = _backbone()
    torch.manual_seed(seed)
    config = SegmenterConfig(use_text=use_text, head_channels=8,
                             fusion=FusionConfig(dim=8, heads=2, text_residual=residual, text_dropout=dropout))
    return FastTextDiffModel(backbone, 12 if use_text else 0, config)


def _open(model: FastTextDiffModel) -> None:
    """Make the text residual matter (as after some training)."""
    block = model.fusion.blocks[0]
    with torch.no_grad():
        if block.gate is not None:
            block.gate.fill_(1.0)
        else:
            block.attn.out_proj.weight.normal_()


TEXT_KEYS = {"fusion.text_project.weight", "fusion.text_project.bias", "fusion.blocks.0.norm_q.weight",
             "fusion.blocks.0.norm_q.bias", "fusion.blocks.0.norm_kv.weight", "fusion.blocks.0.norm_kv.bias",
             "fusion.blocks.0.attn.in_proj_weight", "fusion.blocks.0.attn.in_proj_bias",
             "fusion.blocks.0.attn.out_proj.weight", "fusion.blocks.0.attn.out_proj.bias"}


@pytest.mark.parametrize("residual", ["zero", "gate"])
def test_closed_text_path_starts_as_the_no_text_model(residual):
    model, plain = _model(True, residual), _model(False)
    shared = plain.trainable_state_dict()
    own = model.trainable_state_dict()
    assert all(torch.equal(own[k], v) for k, v in shared.items())  # same image-path weights
    assert {k for k in own if k not in shared} == TEXT_KEYS | (
        {"fusion.blocks.0.gate"} if residual == "gate" else set())
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    states, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(model.eval()(x, states, mask), plain.eval()(x), rtol=0, atol=0)
    # the reference's plain residual changes the output from the first step
    assert not torch.allclose(_model(True, "plain").eval()(x, states, mask), plain(x))


@pytest.mark.parametrize("residual", ["zero", "gate"])
def test_text_path_opens_when_the_report_decides_the_mask(residual):
    """Two reports, two opposite masks on the same image: only the text can tell them apart."""
    model = _model(True, residual)
    x = torch.rand(1, 1, 32, 32).repeat(2, 1, 1, 1) * 2 - 1
    states = torch.randn(2, 3, 12)
    mask = torch.ones(2, 3, dtype=torch.bool)
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[0, :, :16] = 1
    target[1, :, 16:] = 1
    with torch.no_grad():
        features = model.backbone.features(x)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model.forward_features(features, states, mask), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    block = model.fusion.blocks[0]
    opened = block.gate.detach().abs() if residual == "gate" else block.attn.out_proj.weight.detach().abs().max()
    assert float(opened) > 0.05
    pred = model.eval().forward_features(features, states, mask).argmax(1)
    assert (pred == target).float().mean() > 0.9


def test_text_dropout_gives_the_no_text_network_per_sample():
    model = _model(True, dropout=0.5)
    _open(model)
    plain = _model(False)
    plain.load_state_dict(model.state_dict(), strict=False)  # the same image path
    features = [torch.randn(64, c, s, s) for c, s in zip(model.backbone.feature_channels, (8, 16))]
    features = model.pool_features(features)
    states, mask = torch.randn(64, 4, 12), torch.ones(64, 4, dtype=torch.bool)
    model.fusion.train()
    plain.fusion.train()
    torch.manual_seed(0)
    fused = model.fusion(features, states, mask)
    without = plain.fusion(features)
    with_text = model.fusion.eval()(features, states, mask)
    dropped = torch.tensor([torch.equal(fused[0][i], without[0][i]) for i in range(64)])
    kept = torch.tensor([torch.equal(fused[0][i], with_text[0][i]) for i in range(64)])
    assert bool((dropped ^ kept).all())  # each sample is either the no_text or the text network, at every scale
    assert all(torch.equal(f[dropped], w[dropped]) for f, w in zip(fused, without))
    assert 16 <= int(dropped.sum()) <= 48  # about half of 64
    # evaluation never drops the report
    torch.testing.assert_close(model.fusion.eval()(features, states, mask)[0], with_text[0])


def test_text_path_options_are_checked():
    with pytest.raises(ValueError, match="text_residual"):
        FusionConfig(text_residual="open")
    with pytest.raises(ValueError, match="text_dropout"):
        FusionConfig(text_dropout=1.0)
    with pytest.raises(ValueError, match="text_dropout"):
        FusionConfig(text_dropout=-0.1)


def test_models_saved_before_the_text_path_options_load_as_they_were(tmp_path):
    """A record without text_residual/text_dropout is a model from before them: it loads "plain"."""
    model = _model(True, "plain").eval()
    model.save(tmp_path / "m", TextConfig(encoder="tiny"))
    path = tmp_path / "m" / MODEL_CONFIG_FILE
    record = json.loads(path.read_text())
    for key in ("text_residual", "text_dropout"):
        del record["segmenter"]["fusion"][key]
    path.write_text(json.dumps(record))
    loaded, _ = FastTextDiffModel.load(tmp_path / "m")
    assert loaded.config.fusion.text_residual == "plain"
    x, s, m = torch.rand(1, 1, 32, 32), torch.randn(1, 3, 12), torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(loaded(x, s, m), model(x, s, m))


@pytest.mark.parametrize("residual", ["zero", "gate"])
def test_closed_text_path_round_trips(tmp_path, residual):
    model = _model(True, residual, dropout=0.3).eval()
    _open(model)
    model.save(tmp_path / "m", TextConfig(encoder="tiny"))
    loaded, record = FastTextDiffModel.load(tmp_path / "m")
    assert record["segmenter"]["fusion"]["text_residual"] == residual and loaded.config.fusion.text_dropout == 0.3
    x, s, m = torch.rand(1, 1, 32, 32), torch.randn(1, 3, 12), torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(loaded(x, s, m), model(x, s, m))


def test_per_scale_blocks_draw_distinct_text_weights():
    torch.manual_seed(0)
    fusion = CrossModalFusion([4, 4], text_dim=8,
                              config=FusionConfig(dim=8, heads=2, shared=False, text_residual="zero"))
    a, b = fusion.blocks[0].attn.in_proj_weight, fusion.blocks[1].attn.in_proj_weight
    assert not torch.equal(a, b)


def _train(tiny_dataset, tiny_backbone, out, use_text, fallback, epochs=2):
    from fasttextdiff.config import TrainConfig
    from fasttextdiff.training.workflows import load_lvit
    from fasttextdiff.training.segmenter import train_segmenter

    splits = load_lvit(tiny_dataset)
    config = SegmenterConfig(use_text=use_text, head_channels=8,
                             fusion=FusionConfig(dim=16, heads=2, text_residual="zero"))
    return train_segmenter(splits["train"], out, backbone_dir=tiny_backbone, text_config=TextConfig(encoder="tiny"),
                           segmenter_config=config, val_samples=splits["val"], test_samples=splits["test"],
                           train_config=TrainConfig(epochs=epochs, batch_size=4, lr=1e-2, text_fallback=fallback),
                           progress=False)


def test_text_fallback_first_trains_exactly_the_no_text_network(tmp_path, tiny_dataset, tiny_backbone):
    plain = _train(tiny_dataset, tiny_backbone, tmp_path / "plain", use_text=False, fallback=False)
    text = _train(tiny_dataset, tiny_backbone, tmp_path / "text", use_text=True, fallback=False)
    both = _train(tiny_dataset, tiny_backbone, tmp_path / "both", use_text=True, fallback=True)
    assert [h["epoch"] for h in both["history"]] == [1, 2, 3, 4]  # 2 image-only epochs, then 2 with the text
    # the image-only phase is the no_text run, to the last bit: same losses, same validation scores
    assert both["history"][:2] == plain["history"]
    # the text phase is a fresh run from the same start (not a continuation of the image-only fit): it is
    # the run without the fallback, to the last bit
    assert [{**h, "epoch": h["epoch"] - 2} for h in both["history"][2:]] == text["history"]
    assert both["text_fallback"] in ("image", "text")
    if both["text_fallback"] == "image":  # validation preferred the image-only model: it is the no_text model
        assert both["best_epoch"] <= 2 and both["test"] == plain["test"]
    else:
        assert both["best_epoch"] > 2 and both["best_val_dice"] > plain["best_val_dice"]
    loaded, _ = FastTextDiffModel.load(tmp_path / "both")
    assert loaded.fusion.text_enabled  # the switch is a training phase, never saved


def test_the_default_text_path_starts_closed_and_falls_back():
    from fasttextdiff.config import TrainConfig

    assert FusionConfig().text_residual == "zero" and TrainConfig().text_fallback is True


@pytest.mark.parametrize("residual, with_val, continued, reason", [
    ("plain", True, False, "does not start as the no_text network"),
    ("zero", False, False, "no validation split"),
    ("zero", True, True, "continued training keeps the choice")])
def test_text_fallback_is_skipped_where_it_cannot_work(tmp_path, tiny_dataset, tiny_backbone, tiny_model, caplog,
                                                       residual, with_val, continued, reason):
    """A 'plain' residual (older models retrained, the reference's fusion) is not the no_text network at
    the start, and without a validation split nothing can choose between the phases: the text then trains
    from epoch 1, for `epochs` epochs, and the log says why (this used to be a ValueError for 'plain').
    Continued training (the server retraining its served model) keeps the text the served model learned."""
    import logging

    from fasttextdiff.config import TrainConfig
    from fasttextdiff.training.workflows import load_lvit
    from fasttextdiff.training.segmenter import train_segmenter

    splits = load_lvit(tiny_dataset)
    segmenter = SegmenterConfig(head_channels=8, fusion=FusionConfig(dim=16, heads=2, text_residual=residual))
    if continued:  # the session's tiny model, built with the reference fusion: the same architecture
        segmenter = FastTextDiffModel.load(tiny_model)[0].config
    with caplog.at_level(logging.INFO, logger="fasttextdiff.training.segmenter"):
        metrics = train_segmenter(
            splits["train"], tmp_path / "m", backbone_dir=tiny_backbone, text_config=TextConfig(),
            segmenter_config=segmenter, train_config=TrainConfig(epochs=1, batch_size=4, text_fallback=True),
            val_samples=splits["val"] if with_val else None, progress=False,
            init_dir=tiny_model if continued else None)
    assert metrics["epochs"] == 1 and "text_fallback" not in metrics
    assert "text_fallback skipped" in caplog.text and reason in caplog.text


def test_cli_train_exposes_the_text_path_switches():
    from fasttextdiff.commands.main import build_parser

    base = ["train", "--data", "d", "--backbone", "b", "--out", "o"]
    defaults = build_parser().parse_args(base)
    assert defaults.text_residual == "zero" and defaults.no_text_fallback is False
    chosen = build_parser().parse_args(base + ["--text-residual", "plain", "--no-text-fallback"])
    assert chosen.text_residual == "plain" and chosen.no_text_fallback is True


def test_server_conf_text_residual_defaults_to_the_library_and_is_checked():
    import sys

    from server_fixtures import APP_DIR

    sys.path.insert(0, str(APP_DIR))
    try:
        from lib.configs.app_conf import AppConf

        assert AppConf.from_conf({}).text_residual == "zero" == FusionConfig().text_residual
        assert AppConf.from_conf({"text_residual": "plain"}).text_residual == "plain"
        # the first build may use the fallback; off by default because it doubles that build's time
        assert AppConf.from_conf({}).text_fallback is False
        assert AppConf.from_conf({"text_fallback": "true"}).text_fallback is True
        # report focus for long reports: off ("" = the whole report) unless named
        assert AppConf.from_conf({}).text_focus == ""
        assert AppConf.from_conf({"text_focus": "Lung opacity."}).text_focus == "Lung opacity."
        with pytest.raises(ValueError, match="--conf text_residual must be one of plain, zero, gate"):
            AppConf.from_conf({"text_residual": "open"})
    finally:
        sys.path.remove(str(APP_DIR))


def test_cross_attention_matches_the_module_it_replaces():
    """The fusion's attention runs through scaled_dot_product_attention with a broadcast padding mask;
    values and gradients equal nn.MultiheadAttention's own forward on the same parameters."""
    from torch import nn

    from fasttextdiff.models.fusion import cross_attention

    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, batch_first=True)
    query = torch.randn(3, 50, 32, requires_grad=True)
    kv = torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False  # one real token
    ours = cross_attention(attn, query, kv, mask, training=False)
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), query)
    theirs, _ = attn(query, kv, kv, key_padding_mask=~mask, need_weights=False)
    (grad_theirs,) = torch.autograd.grad(theirs.square().sum(), query)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad_ours, grad_theirs)
    # padding carries no weight: changing padded keys changes nothing
    kv2 = kv.clone()
    kv2[1, 4:] = 100.0
    torch.testing.assert_close(cross_attention(attn, query, kv2, mask, training=False), ours)

"""A text path that only helps: the gated text residual starts as the no_text network, opens when
the report carries information, and text dropout trains the image path on its own."""

from __future__ import annotations

import json

import pytest
import torch

from fasttextdiff.backbone import DiffusionBackbone
from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig, TextConfig
from fasttextdiff.fusion import CrossModalFusion
from fasttextdiff.model import MODEL_CONFIG_FILE, FastTextDiffModel


def _backbone() -> DiffusionBackbone:
    torch.manual_seed(0)
    return DiffusionBackbone(BackboneConfig(image_size=32, block_out_channels=(8, 16), timesteps=(50, 150)))


def _model(use_text: bool, gate: bool = True, dropout: float = 0.0, seed: int = 1) -> FastTextDiffModel:
    backbone = _backbone()
    torch.manual_seed(seed)
    config = SegmenterConfig(use_text=use_text, head_channels=8,
                             fusion=FusionConfig(dim=8, heads=2, text_gate=gate, text_dropout=dropout))
    return FastTextDiffModel(backbone, 12 if use_text else 0, config)


def test_gated_model_starts_as_the_no_text_model():
    gated, plain = _model(True), _model(False)
    shared = plain.trainable_state_dict()
    own = gated.trainable_state_dict()
    assert all(torch.equal(own[k], v) for k, v in shared.items())  # same image-path weights
    assert {k for k in own if k not in shared} == {
        "fusion.text_project.weight", "fusion.text_project.bias", "fusion.blocks.0.gate",
        "fusion.blocks.0.norm_q.weight", "fusion.blocks.0.norm_q.bias", "fusion.blocks.0.norm_kv.weight",
        "fusion.blocks.0.norm_kv.bias", "fusion.blocks.0.attn.in_proj_weight", "fusion.blocks.0.attn.in_proj_bias",
        "fusion.blocks.0.attn.out_proj.weight", "fusion.blocks.0.attn.out_proj.bias"}
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    states, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(gated.eval()(x, states, mask), plain.eval()(x), rtol=0, atol=0)
    # without the gate the text branch changes the output from the first step
    ungated = _model(True, gate=False)
    assert not torch.allclose(ungated.eval()(x, states, mask), plain(x))


def test_gate_opens_when_the_report_decides_the_mask():
    """Two reports, two opposite masks on the same image: only the text can tell them apart."""
    model = _model(True)
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
    assert abs(float(torch.tanh(model.fusion.blocks[0].gate.detach()))) > 0.05
    pred = model.eval().forward_features(features, states, mask).argmax(1)
    assert (pred == target).float().mean() > 0.9


def test_text_dropout_gives_the_no_text_network_per_sample():
    model = _model(True, dropout=0.5)
    with torch.no_grad():
        model.fusion.blocks[0].gate.fill_(1.0)  # an open gate: the text matters
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


def test_text_dropout_must_be_a_probability():
    with pytest.raises(ValueError, match="text_dropout"):
        FusionConfig(text_dropout=1.0)
    with pytest.raises(ValueError, match="text_dropout"):
        FusionConfig(text_dropout=-0.1)


def test_models_saved_before_the_gate_load_as_they_were(tmp_path):
    """A record without text_gate/text_dropout is a model from before the gate: it loads ungated."""
    model = _model(True, gate=False).eval()
    model.save(tmp_path / "m", TextConfig(encoder="tiny"))
    path = tmp_path / "m" / MODEL_CONFIG_FILE
    record = json.loads(path.read_text())
    for key in ("text_gate", "text_dropout"):
        del record["segmenter"]["fusion"][key]
    path.write_text(json.dumps(record))
    loaded, _ = FastTextDiffModel.load(tmp_path / "m")
    assert loaded.fusion.blocks[0].gate is None and not loaded.config.fusion.text_gate
    x, s, m = torch.rand(1, 1, 32, 32), torch.randn(1, 3, 12), torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(loaded(x, s, m), model(x, s, m))


def test_gated_model_round_trips(tmp_path):
    model = _model(True, dropout=0.3).eval()
    with torch.no_grad():
        model.fusion.blocks[0].gate.fill_(0.7)
    model.save(tmp_path / "m", TextConfig(encoder="tiny"))
    loaded, record = FastTextDiffModel.load(tmp_path / "m")
    assert record["segmenter"]["fusion"]["text_gate"] is True and loaded.config.fusion.text_dropout == 0.3
    x, s, m = torch.rand(1, 1, 32, 32), torch.randn(1, 3, 12), torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(loaded(x, s, m), model(x, s, m))


def test_per_scale_blocks_draw_distinct_text_weights():
    torch.manual_seed(0)
    fusion = CrossModalFusion([4, 4], text_dim=8, config=FusionConfig(dim=8, heads=2, shared=False, text_gate=True))
    a, b = fusion.blocks[0].attn.in_proj_weight, fusion.blocks[1].attn.in_proj_weight
    assert not torch.equal(a, b)


def _train(tiny_dataset, tiny_backbone, out, use_text, fallback, epochs=2):
    from fasttextdiff.config import TrainConfig
    from fasttextdiff.pipeline import load_lvit
    from fasttextdiff.train import train_segmenter

    splits = load_lvit(tiny_dataset)
    config = SegmenterConfig(use_text=use_text, head_channels=8, fusion=FusionConfig(dim=16, heads=2, text_gate=True))
    return train_segmenter(splits["train"], out, backbone_dir=tiny_backbone, text_config=TextConfig(encoder="tiny"),
                           segmenter_config=config, val_samples=splits["val"], test_samples=splits["test"],
                           train_config=TrainConfig(epochs=epochs, batch_size=4, lr=1e-2, text_fallback=fallback),
                           progress=False)


def test_text_fallback_first_trains_exactly_the_no_text_network(tmp_path, tiny_dataset, tiny_backbone):
    plain = _train(tiny_dataset, tiny_backbone, tmp_path / "plain", use_text=False, fallback=False)
    both = _train(tiny_dataset, tiny_backbone, tmp_path / "both", use_text=True, fallback=True)
    assert [h["epoch"] for h in both["history"]] == [1, 2, 3, 4]  # 2 image-only epochs, then 2 with the text
    # the image-only phase is the no_text run, to the last bit: same losses, same validation scores
    assert both["history"][:2] == plain["history"]
    assert both["text_fallback"] in ("image", "text")
    if both["text_fallback"] == "image":  # validation preferred the image-only model: it is the no_text model
        assert both["best_epoch"] <= 2 and both["test"] == plain["test"]
    else:
        assert both["best_epoch"] > 2 and both["best_val_dice"] > plain["best_val_dice"]
    loaded, _ = FastTextDiffModel.load(tmp_path / "both")
    assert loaded.fusion.text_enabled  # the switch is a training phase, never saved


def test_text_fallback_needs_the_gate(tmp_path, tiny_dataset, tiny_backbone):
    from fasttextdiff.config import TrainConfig
    from fasttextdiff.pipeline import load_lvit
    from fasttextdiff.train import train_segmenter

    splits = load_lvit(tiny_dataset)
    with pytest.raises(ValueError, match="text_gate"):
        train_segmenter(splits["train"], tmp_path / "m", backbone_dir=tiny_backbone, text_config=TextConfig(),
                        segmenter_config=SegmenterConfig(head_channels=8, fusion=FusionConfig(dim=16, heads=2)),
                        train_config=TrainConfig(epochs=1, batch_size=4, text_fallback=True), progress=False)

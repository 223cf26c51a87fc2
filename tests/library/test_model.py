"""Fusion and segmenter: shapes, the text padding mask, text sensitivity, save/load, corrupt files."""

from __future__ import annotations

import pytest
import torch

from fasttextdiff.models.backbone import DiffusionBackbone
from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig, TextConfig
from fasttextdiff.utils.errors import CheckpointError, ModelNotFoundError
from fasttextdiff.models.fusion import CrossModalFusion, sine_positions_2d
from fasttextdiff.models.segmenter import WEIGHTS_FILE, FastTextDiffModel


def tiny_backbone(size=32, widths=(8, 16), timesteps=(50, 150)) -> DiffusionBackbone:
    torch.manual_seed(0)
    return DiffusionBackbone(BackboneConfig(image_size=size, block_out_channels=widths, timesteps=timesteps))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("scales", [[(12, 8), (6, 16)], [(4, 4)]])
def test_fusion_shapes(shared, scales):
    fusion = CrossModalFusion([c for c, _ in scales], text_dim=24, config=FusionConfig(dim=16, heads=2, shared=shared))
    feats = [torch.randn(3, c, s, s) for c, s in scales]
    out = fusion(feats, torch.randn(3, 5, 24), torch.ones(3, 5, dtype=torch.bool))
    assert [tuple(o.shape) for o in out] == [(3, 16, s, s) for _, s in scales]
    assert len(fusion.blocks) == (1 if shared else len(scales))


def test_fusion_ignores_padded_text_tokens():
    torch.manual_seed(0)
    # "plain": random text weights act from the start (the default "zero" ignores the text until trained)
    fusion = CrossModalFusion([4], text_dim=8, config=FusionConfig(dim=8, heads=2, text_residual="plain")).eval()
    feats = [torch.randn(1, 4, 4, 4)]
    text = torch.randn(1, 3, 8)
    padded = torch.cat([text, 100 * torch.randn(1, 4, 8)], dim=1)
    mask = torch.tensor([[True] * 3 + [False] * 4])
    a = fusion(feats, text, torch.ones(1, 3, dtype=torch.bool))[0]
    b = fusion(feats, padded, mask)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    c = fusion(feats, padded, torch.ones(1, 7, dtype=torch.bool))[0]  # unmasked garbage must matter
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("bad", [
    dict(dim=10, heads=4),  # not divisible by heads
    dict(dim=6, heads=2),  # not divisible by 4 for positions
    dict(dim=16, heads=2, dropout=1.0),
])
def test_fusion_config_rejects_bad_combinations(bad):
    with pytest.raises(ValueError):
        FusionConfig(**bad)


def test_fusion_rejects_wrong_inputs():
    fusion = CrossModalFusion([4, 4], text_dim=8, config=FusionConfig(dim=8, heads=2))
    with pytest.raises(ValueError, match="feature scales"):
        fusion([torch.randn(1, 4, 4, 4)], torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="report"):
        fusion([torch.randn(1, 4, 4, 4)] * 2, None)
    with pytest.raises(ValueError, match="batch"):
        fusion([torch.randn(2, 4, 4, 4)] * 2, torch.randn(1, 2, 8))


def test_positions_differ_by_place_and_match_across_scales():
    p8 = sine_positions_2d(8, 8, 16)
    assert p8.shape == (64, 16)
    assert len({tuple(r.round(decimals=4).tolist()) for r in p8}) == 64  # every pixel distinct
    p4 = sine_positions_2d(4, 4, 16)
    # positions are normalised: a coarse cell is closest to the fine cells it covers, at every scale
    fine = p8.view(8, 8, 16)
    for (cy, cx) in [(0, 0), (3, 1), (2, 3)]:
        dist = (fine - p4.view(4, 4, 16)[cy, cx]).norm(dim=-1)
        y, x = divmod(int(dist.argmin()), 8)
        assert (y // 2, x // 2) == (cy, cx)


@pytest.mark.parametrize("num_classes,labels", [(2, ("lesion",)), (3, ("lesion", "effusion"))])
def test_model_logits_and_prediction(num_classes, labels):
    model = FastTextDiffModel(tiny_backbone(), 12, SegmenterConfig(num_classes=num_classes, labels=labels,
                                                                   head_channels=8,
                                                                   fusion=FusionConfig(dim=8, heads=2)))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    states, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    logits = model(x, states, mask)
    assert logits.shape == (2, num_classes, 32, 32)
    pred = model.eval().predict(x, states, mask, n_noise=3)
    assert pred.probabilities.shape == (2, num_classes, 32, 32)
    torch.testing.assert_close(pred.probabilities.sum(1), torch.ones(2, 32, 32))
    assert pred.mask.shape == pred.uncertainty.shape == (2, 32, 32)
    assert float(pred.uncertainty.max()) > 0  # different noise draws disagree somewhere
    assert float(model.predict(x, states, mask, n_noise=1).uncertainty.abs().max()) == 0


@pytest.mark.parametrize("residual", ["plain", "zero"])
def test_only_fusion_and_head_train_and_text_changes_output(residual):
    model = FastTextDiffModel(tiny_backbone(), 12, SegmenterConfig(head_channels=8, fusion=FusionConfig(
        dim=8, heads=2, text_residual=residual)))
    assert all(not p.requires_grad for p in model.backbone.parameters())
    x = torch.rand(1, 1, 32, 32)
    model.eval()
    a = model(x, torch.randn(1, 4, 12), torch.ones(1, 4, dtype=torch.bool))
    b = model(x, torch.randn(1, 4, 12), torch.ones(1, 4, dtype=torch.bool))
    # "zero" (the default) starts as the image-only network: the report matters only once trained
    assert torch.allclose(a, b) if residual == "zero" else not torch.allclose(a, b)
    loss = a.sum()
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert any(p.grad is not None for p in model.fusion.parameters())


def test_no_text_model_needs_no_text():
    model = FastTextDiffModel(tiny_backbone(), 0, SegmenterConfig(use_text=False, head_channels=8,
                                                                  fusion=FusionConfig(dim=8, heads=2)))
    assert model.fusion.text_project is None
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2, 32, 32)


def test_save_load_round_trip_and_corruption(tmp_path):
    model = FastTextDiffModel(tiny_backbone(), 12,
                              SegmenterConfig(head_channels=8, fusion=FusionConfig(dim=8, heads=2)))
    model.eval()
    model.save(tmp_path / "m", TextConfig(encoder="tiny"), metrics={"note": 1})
    loaded, record = FastTextDiffModel.load(tmp_path / "m")
    x, s, m = torch.rand(1, 1, 32, 32), torch.randn(1, 3, 12), torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(model(x, s, m), loaded(x, s, m))
    assert record["metrics"] == {"note": 1} and record["text"]["encoder"] == "tiny"

    weights = tmp_path / "m" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        FastTextDiffModel.load(tmp_path / "m")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        FastTextDiffModel.load(tmp_path / "nope")

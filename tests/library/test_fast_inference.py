"""The batched inference core: same answers as the plain path, air skipped, slices independent of batching.

Every comparison here is of two paths that compute the same thing, so both run in fp32 (`FAST`): the
default precision follows FASTTEXTDIFF_PRECISION and the hardware (bf16 on CPUs with AVX512-BF16/AMX),
whose rounding no 1e-5 tolerance holds. Reduced precision has its own tests (test_precision.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fasttextdiff.data.io import read_image
from fasttextdiff.inference.batched import InferenceOptions, air_slices, predict_slices, resolve_precision
from fasttextdiff.inference.pipeline import Segmenter

CPU = torch.device("cpu")
FAST = InferenceOptions(precision="fp32")  # the fast path's every speed measure, at the reference's precision


@pytest.fixture(scope="module")
def model_and_text(untrained_tiny_model):
    return untrained_tiny_model


@pytest.mark.parametrize("n_noise", [1, 4])
def test_fast_path_matches_the_reference_path_on_a_2d_image(model_and_text, n_noise):
    model, states, mask = model_and_text
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    ref_p, ref_u = predict_slices(model, x, states, mask, n_noise, InferenceOptions.reference(), CPU)
    fast_p, fast_u = predict_slices(model, x, states, mask, n_noise, FAST, CPU)
    torch.testing.assert_close(fast_p, ref_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_u, ref_u, atol=1e-5, rtol=1e-5)
    assert (fast_u > 0).any() == (n_noise > 1)  # one draw has no spread


def test_air_slices_skip_the_network_and_slices_do_not_depend_on_their_batch(model_and_text):
    model, states, mask = model_and_text
    torch.manual_seed(1)
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    x[2] = -1.0  # all air
    assert air_slices(x).tolist() == [False, False, True, False, False, False]
    p, u = predict_slices(model, x, states, mask, 3, FAST.but(max_batch_items=4), CPU)  # 1 slice per forward
    assert torch.all(p[2, 0] == 1) and torch.all(p[2, 1:] == 0) and torch.all(u[2] == 0)
    wide_p, wide_u = predict_slices(model, x, states, mask, 3, FAST.but(max_batch_items=64), CPU)
    torch.testing.assert_close(wide_p, p, atol=1e-5, rtol=1e-5)
    alone_p, alone_u = predict_slices(model, x[4:5], states, mask, 3, FAST, CPU)  # as a 2D image
    torch.testing.assert_close(alone_p[0], p[4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone_u[0], u[4], atol=1e-5, rtol=1e-5)
    sequential_p, _ = predict_slices(model, x, states, mask, 3,
                                     FAST.but(batch_draws=False, channels_last=False, skip_air=False), CPU)
    torch.testing.assert_close(sequential_p[[0, 1, 3, 4, 5]], p[[0, 1, 3, 4, 5]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sequential_p[2], p[2])  # without the skip the air slice went through the network


def test_softmax_uncertainty_is_one_draw_bernoulli_std(model_and_text):
    model, states, mask = model_and_text
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    p, u = predict_slices(model, x, states, mask, 4, FAST.but(uncertainty="softmax"), CPU)
    one_p, _ = predict_slices(model, x, states, mask, 1, FAST, CPU)
    torch.testing.assert_close(p, one_p)  # the n_noise draws are not run
    torch.testing.assert_close(u, (p[:, 1] * (1 - p[:, 1])).sqrt())
    assert 0 <= float(u.min()) and float(u.max()) <= 0.5 and float(u.max()) > 0


def test_options_reject_bad_values_and_precision_is_native_only():
    with pytest.raises(ValueError, match="precision"):
        InferenceOptions(precision="int8")
    with pytest.raises(ValueError, match="uncertainty"):
        InferenceOptions(uncertainty="mc")
    with pytest.raises(ValueError, match="max_batch_items"):
        InferenceOptions(max_batch_items=0)
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto", CPU) is (torch.bfloat16 if native else None)


def test_backbone_rejects_noise_of_another_shape(model_and_text):
    model, _, _ = model_and_text
    with pytest.raises(ValueError, match="noise must be shaped like"):
        model.backbone.features(torch.zeros(2, 1, 32, 32), noise=torch.zeros(1, 1, 32, 32))


def test_segmenter_fast_and_reference_agree_on_a_real_model(tiny_model, tiny_dataset):
    image_path = next((tiny_dataset / "Test_Folder" / "img").glob("*"))
    image = read_image(image_path)
    fast = Segmenter.load(tiny_model, n_noise=2, options=FAST)
    ref = Segmenter.load(tiny_model, n_noise=2, options=InferenceOptions.reference())
    a, b = fast.segment(image, "a lesion in the upper left lung"), ref.segment(image,
                                                                               "a lesion in the upper left lung")
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    np.testing.assert_allclose(a.uncertainty, b.uncertainty, atol=1e-5)
    assert (a.mask == b.mask).all()

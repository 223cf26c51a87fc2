"""Shared, session-scoped fixtures: one tiny dataset, backbone and model built once per test run.

Everything is real (files on disk, a pretrained-for-a-few-steps diffusers U-Net, a tiny
ModernBERT), just small enough to build in seconds on two CPU cores.
"""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

from fasttextdiff.utils.environment import apply_process_defaults

apply_process_defaults()  # offline, passive OpenMP: before torch loads
import pytest
import torch
from hypothesis import configuration as hypothesis_configuration
from hypothesis import settings as hypothesis_settings

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine threads fight.
torch.set_num_threads(1)

# Hypothesis keeps its files (its example database, and the unicode tables `st.text()` caches even with
# `database=None`) in `./.hypothesis` unless told otherwise: not in the checkout. A per-user folder in the
# temp folder, kept between runs (the tables are a cache); no example database (the fuzz is derandomized).
HYPOTHESIS_HOME = Path(os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY")
                       or Path(tempfile.gettempdir()) / f"fasttextdiff-hypothesis-{getpass.getuser()}")
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(HYPOTHESIS_HOME)  # subprocesses too
hypothesis_configuration.set_hypothesis_home_dir(HYPOTHESIS_HOME)
hypothesis_settings.register_profile("fasttextdiff", database=None)
hypothesis_settings.load_profile("fasttextdiff")

# The server and Slicer fixtures (tests/server_fixtures.py, tests/slicer_fixtures.py), registered once for
# every test module; test modules import only their plain helpers.
pytest_plugins = ["server_fixtures", "slicer_fixtures"]


@pytest.fixture(scope="session")
def accelerate_launch():
    """The command prefix that runs a module on N processes with `accelerate launch` (gloo on CPUs), on a
    free loopback port so parallel test runs do not collide."""
    import socket
    import sys

    def command(num_processes: int) -> list[str]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "-m"]

    return command


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tiny encoders and text caches go to a per-run folder, not the user's home."""
    if "FASTTEXTDIFF_CACHE" not in os.environ:
        os.environ["FASTTEXTDIFF_CACHE"] = str(tmp_path_factory.mktemp("fasttextdiff-cache"))
    yield


@pytest.fixture(scope="session")
def untrained_tiny_model():
    """(a randomly initialised 32 px segmenter in eval mode, report states, their mask): for tests that compare
    two inference paths on the same weights; no test may change it."""
    from fasttextdiff.config import BackboneConfig, FusionConfig, SegmenterConfig
    from fasttextdiff.models.backbone import DiffusionBackbone
    from fasttextdiff.models.segmenter import FastTextDiffModel

    torch.manual_seed(0)
    backbone = DiffusionBackbone(BackboneConfig(image_size=32, block_out_channels=(8, 16), timesteps=(50, 150)))
    model = FastTextDiffModel(backbone, 16, SegmenterConfig(fusion=FusionConfig(dim=16, heads=2))).eval()
    return model, torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from fasttextdiff.data.synthetic import make_lvit_dataset

    return make_lvit_dataset(tmp_path_factory.mktemp("data") / "synth", variant="text-necessary",
                             n_train=8, n_val=4, n_test=4, size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory, tiny_dataset) -> Path:
    from fasttextdiff.config import BackboneConfig
    from fasttextdiff.training.workflows import lvit_image_paths, pretrain_backbone_on_files

    out = tmp_path_factory.mktemp("backbone") / "backbone"
    cfg = BackboneConfig(image_size=32, block_out_channels=(8, 16), timesteps=(50, 150))
    pretrain_backbone_on_files(lvit_image_paths(tiny_dataset), cfg, out, epochs=1, max_steps=3, batch_size=4,
                               progress=False, resume=False)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_dataset, tiny_backbone) -> Path:
    from fasttextdiff.config import FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.training.workflows import load_lvit
    from fasttextdiff.training.segmenter import train_segmenter

    splits = load_lvit(tiny_dataset)
    out = tmp_path_factory.mktemp("model") / "model"
    train_segmenter(splits["train"], out, backbone_dir=tiny_backbone, text_config=TextConfig(encoder="tiny"),
                    segmenter_config=SegmenterConfig(head_channels=8, fusion=FusionConfig(dim=16, heads=2)),
                    train_config=TrainConfig(epochs=1, batch_size=4, lr=1e-3), val_samples=splits["val"],
                    progress=False)
    return out


@pytest.fixture(scope="session")
def pristine_tiny_model_root(tmp_path_factory) -> Path:
    """One tiny published model root (versions/ + current) per test process, built from seed-1 tiny studies
    by the app's workflows. Never served as is: `tiny_model_root` and `shared_tiny_model_root` hand out
    copies (a server may publish into its model root)."""
    from server_fixtures import build_tiny_model, make_tiny_studies

    studies = make_tiny_studies(tmp_path_factory.mktemp("pristine-model-studies") / "demo", seed=1)
    return build_tiny_model(studies, tmp_path_factory.mktemp("pristine-model") / "root")


@pytest.fixture(scope="session")
def pristine_marking_tiny_model_root(tmp_path_factory) -> Path:
    """Like `pristine_tiny_model_root`, with the reference fusion (`text_residual` "plain"): a 2-epoch tiny model
    with the default fusion (a text path that starts closed) marks no pixel of the test images, and a test of what
    happens to a mask on its way (Slicer's segment geometry, an edit and its round trip) needs a mask that is not
    empty. The fusion is incidental there; the server tests run the default."""
    from server_fixtures import build_tiny_model, make_tiny_studies

    studies = make_tiny_studies(tmp_path_factory.mktemp("marking-model-studies") / "demo", seed=1)
    return build_tiny_model(studies, tmp_path_factory.mktemp("marking-model") / "root", {"text_residual": "plain"})


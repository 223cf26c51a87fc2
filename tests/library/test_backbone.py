"""DiffusionBackbone and pretrain_backbone on tiny real diffusers U-Nets (widths 8/16, 32 px, CPU)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from fasttextdiff.models.backbone import BACKBONE_CONFIG_NAME, UNET_WEIGHTS_NAME, DiffusionBackbone
from fasttextdiff.training.backbone import pretrain_backbone
from fasttextdiff.config import BackboneConfig
from fasttextdiff.utils.errors import CheckpointError, FastTextDiffError, ModelNotFoundError

SIZE = 32


def tiny_config(**changes) -> BackboneConfig:
    base = dict(image_size=SIZE, block_out_channels=(8, 16), timesteps=(50, 150), layers_per_block=1)
    base.update(changes)
    return BackboneConfig(**base)


def images(n: int = 8, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Smooth blobs on a gradient: structured enough that a denoiser can learn something quickly."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = (torch.rand(2, generator=g) - 0.5).tolist()
        r = 0.2 + 0.3 * torch.rand(1, generator=g).item()
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).float()
        img = (0.6 * blob + 0.4 * (xx + 1) / 2) * 2 - 1
        out.append(img.expand(channels, SIZE, SIZE).clone())
    return torch.stack(out)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a thread pool, and on a shared, loaded machine its spinning costs seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbone() -> DiffusionBackbone:
    torch.manual_seed(0)
    return DiffusionBackbone(tiny_config()).freeze()


# ---------------------------------------------------------------- features: shapes and geometry


@pytest.mark.parametrize(
    "changes, channels, sizes",
    [
        # two levels: up-block 0 upsamples 16 -> 32, the last up-block has no upsampler (stays at 32)
        (dict(), [16 * 2, 8 * 2], [32, 32]),
        # three levels with attention, three timesteps, blocks 0 and 2 only
        (dict(block_out_channels=(8, 16, 16), attention=True, timesteps=(10, 50, 900), feature_blocks=(2, 0, 2)),
         [16 * 3, 8 * 3], [16, 32]),
        # RGB input, two layers per block
        (dict(in_channels=3, layers_per_block=2, timesteps=(100,)), [16, 8], [32, 32]),
    ],
)
def test_feature_shapes_match_declared_geometry(changes, channels, sizes):
    config = tiny_config(**changes)
    model = DiffusionBackbone(config).freeze()
    assert model.feature_channels == channels
    assert model.feature_sizes == sizes
    x = images(3, channels=config.in_channels)
    feats = model.features(x)
    assert [tuple(f.shape) for f in feats] == [(3, c, s, s) for c, s in zip(channels, sizes)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_attention_config_builds_attention_blocks():
    model = DiffusionBackbone(tiny_config(block_out_channels=(8, 16, 16), attention=True))
    assert model.unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert model.unet.config.up_block_types == ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    plain = DiffusionBackbone(tiny_config(block_out_channels=(8, 16, 16)))
    assert "Attn" not in "".join(plain.unet.config.down_block_types + plain.unet.config.up_block_types)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 3, SIZE, SIZE),  # wrong channels
        torch.zeros(2, 1, 16, 16),  # wrong size
        torch.zeros(2, 1, SIZE, 16),  # not square
        torch.zeros(1, SIZE, SIZE),  # no batch dimension
        torch.zeros(2, 1, SIZE, SIZE, dtype=torch.long),  # not floating point
        torch.zeros(0, 1, SIZE, SIZE),  # empty batch
    ],
)
def test_invalid_inputs_raise_value_error(backbone, bad):
    with pytest.raises(ValueError, match=r"\w+ \w+"):
        backbone.features(bad)


def test_invalid_feature_block_is_rejected():
    with pytest.raises(ValueError, match="feature block"):
        tiny_config(feature_blocks=(5,))


# ---------------------------------------------------------------- features: semantics


def test_features_deterministic_per_seed_and_differ_across_seeds(backbone):
    x = images(2)
    a = backbone.features(x, seed=3)
    b = backbone.features(x, seed=3)
    c = backbone.features(x, seed=4)
    default = backbone.features(x)
    explicit = backbone.features(x, seed=backbone.config.noise_seed)
    for fa, fb, fc, fd, fe in zip(a, b, c, default, explicit):
        assert torch.equal(fa, fb)
        assert not torch.allclose(fa, fc)
        assert torch.equal(fd, fe)


def test_batched_timesteps_equal_one_forward_per_timestep(backbone):
    """Channel block k of every feature must be exactly what a single-timestep backbone gives for t_k."""
    x = images(2)
    both = backbone.features(x, seed=1)
    for k, t in enumerate(backbone.config.timesteps):
        single = DiffusionBackbone(backbone.config.replace(timesteps=(t,)), unet=backbone.unet).freeze()
        for f_all, f_one in zip(both, single.features(x, seed=1)):
            c = f_one.shape[1]
            torch.testing.assert_close(f_all[:, k * c : (k + 1) * c], f_one, atol=1e-5, rtol=1e-4)


def test_a_subset_of_blocks_gives_the_same_maps_as_all_blocks(backbone):
    """Tapping only early blocks ends the forward early; the maps must not change."""
    x = images(2)
    everything = backbone.features(x, seed=0)
    first_only = DiffusionBackbone(backbone.config.replace(feature_blocks=(0,)), unet=backbone.unet).freeze()
    (coarse,) = first_only.features(x, seed=0)
    assert torch.equal(coarse, everything[0])


def test_noise_is_drawn_for_the_full_batch(backbone):
    """Batch items get different noise, so identical images give different features."""
    x = images(1).repeat(2, 1, 1, 1)
    f = backbone.features(x, seed=0)[0]
    assert not torch.allclose(f[0], f[1])


def test_timesteps_rescale_to_short_schedules():
    model = DiffusionBackbone(tiny_config(num_train_timesteps=100, timesteps=(50, 150, 999)))
    assert model.schedule_timesteps == [5, 15, 99]
    assert DiffusionBackbone(tiny_config()).schedule_timesteps == [50, 150]


def test_frozen_backbone_gives_no_gradients():
    model = DiffusionBackbone(tiny_config())
    x = images(2).requires_grad_(True)
    live = model.features(x)
    assert live[0].requires_grad  # not frozen yet: gradients flow
    model.freeze()
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    feats = model.features(x)
    assert not any(f.requires_grad for f in feats)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- persistence


def test_save_load_round_trip_gives_identical_features(backbone, tmp_path):
    out = tmp_path / "bb"
    backbone.save_pretrained(out)
    assert {p.name for p in out.iterdir()} == {BACKBONE_CONFIG_NAME, "config.json", UNET_WEIGHTS_NAME,
                                               "checksums.json"}
    assert not [p for p in tmp_path.iterdir() if p.name != "bb"]  # no staging leftovers
    loaded = DiffusionBackbone.from_pretrained(out).freeze()
    assert loaded.config == backbone.config
    x = images(2)
    for a, b in zip(backbone.features(x, seed=5), loaded.features(x, seed=5)):
        assert torch.equal(a, b)


def test_save_over_existing_dir_replaces_weights_and_keeps_other_entries(tmp_path):
    out = tmp_path / "bb"
    torch.manual_seed(1)
    first = DiffusionBackbone(tiny_config())
    first.save_pretrained(out)
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "marker.txt").write_text("keep me")
    torch.manual_seed(2)
    second = DiffusionBackbone(tiny_config(noise_seed=9))
    second.save_pretrained(out)
    loaded = DiffusionBackbone.from_pretrained(out)
    assert loaded.config.noise_seed == 9
    assert torch.equal(loaded.unet.conv_in.weight, second.unet.conv_in.weight)
    assert (out / "checkpoint" / "marker.txt").read_text(encoding="utf-8") == "keep me"
    (out / "checkpoint.tmp-0123456789ab").mkdir()  # left by an interrupted checkpoint save
    first.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [BACKBONE_CONFIG_NAME, "config.json", UNET_WEIGHTS_NAME, "checksums.json", "checkpoint"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb"]


def test_save_refuses_to_replace_a_directory_with_other_files(backbone, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="thesis.tex"):
        backbone.save_pretrained(out)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no staging leftovers
    empty = tmp_path / "empty"
    empty.mkdir()
    backbone.save_pretrained(empty)
    DiffusionBackbone.from_pretrained(empty)


def test_truncated_weights_raise_checkpoint_error(backbone, tmp_path):
    out = tmp_path / "bb"
    backbone.save_pretrained(out)
    weights = out / UNET_WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        DiffusionBackbone.from_pretrained(out)
    weights.write_bytes(b"\x00" * 64)  # garbage header
    with pytest.raises(CheckpointError):
        DiffusionBackbone.from_pretrained(out)


def test_flipped_weight_bytes_raise_checkpoint_error(backbone, tmp_path):
    """Corruption inside the tensor data keeps the header valid; the recorded sha256 catches it."""
    out = tmp_path / "bb"
    backbone.save_pretrained(out)
    weights = out / UNET_WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        DiffusionBackbone.from_pretrained(out)


def test_non_finite_weights_raise_checkpoint_error(tmp_path):
    model = DiffusionBackbone(tiny_config())
    with torch.no_grad():
        model.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    model.save_pretrained(tmp_path / "bb")
    with pytest.raises(CheckpointError, match="NaN"):
        DiffusionBackbone.from_pretrained(tmp_path / "bb")


def test_corrupt_config_raises_checkpoint_error(backbone, tmp_path):
    out = tmp_path / "bb"
    backbone.save_pretrained(out)
    (out / BACKBONE_CONFIG_NAME).write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        DiffusionBackbone.from_pretrained(out)
    (out / BACKBONE_CONFIG_NAME).write_text(json.dumps({"image_size": SIZE, "bogus": 1}))
    with pytest.raises(CheckpointError, match="bogus"):
        DiffusionBackbone.from_pretrained(out)


def test_weights_of_another_architecture_raise_checkpoint_error(backbone, tmp_path):
    out, other = tmp_path / "bb", tmp_path / "other"
    backbone.save_pretrained(out)
    DiffusionBackbone(tiny_config(block_out_channels=(16, 16))).save_pretrained(other)
    (out / UNET_WEIGHTS_NAME).write_bytes((other / UNET_WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="does not match"):
        DiffusionBackbone.from_pretrained(out)


def test_missing_or_incomplete_dir_raises_model_not_found(backbone, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        DiffusionBackbone.from_pretrained(tmp_path / "nowhere")
    out = tmp_path / "bb"
    backbone.save_pretrained(out)
    (out / UNET_WEIGHTS_NAME).unlink()
    with pytest.raises(ModelNotFoundError, match="incomplete"):
        DiffusionBackbone.from_pretrained(out)


# ---------------------------------------------------------------- any diffusers checkpoint


def _foreign_unet() -> UNet2DModel:
    """A U-Net our config would never build: 2 layers/block, attention at one level, 4 norm groups."""
    torch.manual_seed(3)
    return UNet2DModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )


def test_from_diffusers_loads_a_diffusers_saved_unet(tmp_path):
    unet = _foreign_unet()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    model = DiffusionBackbone.from_diffusers(tmp_path / "unet", timesteps=(20, 40)).freeze()
    cfg = model.config
    assert (cfg.image_size, cfg.in_channels, cfg.block_out_channels, cfg.layers_per_block, cfg.attention) == (
        SIZE, 3, (8, 16, 16), 2, True,
    )
    assert cfg.timesteps == (20, 40)
    assert model.feature_channels == [32, 32, 16] and model.feature_sizes == [16, 32, 32]
    x = images(2, channels=3)
    feats = model.features(x, seed=2)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 16), (2, 32, 32, 32), (2, 16, 32, 32)]
    # the weights really are the saved ones
    assert torch.equal(model.unet.conv_in.weight, unet.conv_in.weight)
    # and the adopted U-Net keeps its own architecture through our save/load
    model.save_pretrained(tmp_path / "ours")
    again = DiffusionBackbone.from_pretrained(tmp_path / "ours").freeze()
    assert again.unet.config.layers_per_block == 2 and again.unet.config.norm_num_groups == 4
    for a, b in zip(feats, again.features(x, seed=2)):
        assert torch.equal(a, b)


def test_from_diffusers_reads_a_pipeline_and_its_schedule(tmp_path):
    pipe = DDPMPipeline(unet=_foreign_unet(),
                        scheduler=DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2"))
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    model = DiffusionBackbone.from_diffusers(tmp_path / "pipe")
    assert model.config.num_train_timesteps == 100 and model.config.beta_schedule == "squaredcos_cap_v2"
    assert model.schedule_timesteps == [5, 15, 25]


def test_from_diffusers_refuses_unets_that_do_not_take_ddpm_timesteps(tmp_path):
    common = dict(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  norm_num_groups=8, layers_per_block=1)
    UNet2DModel(time_embedding_type="fourier", **common).save_pretrained(tmp_path / "sde")
    with pytest.raises(ValueError, match="fourier"):
        DiffusionBackbone.from_diffusers(tmp_path / "sde")
    UNet2DModel(num_class_embeds=4, **common).save_pretrained(tmp_path / "classes")
    with pytest.raises(ValueError, match="class-conditional"):
        DiffusionBackbone.from_diffusers(tmp_path / "classes")


def test_from_diffusers_refuses_missing_and_pickled_checkpoints(tmp_path):
    with pytest.raises(ModelNotFoundError):
        DiffusionBackbone.from_diffusers(tmp_path / "nowhere")
    _foreign_unet().save_pretrained(tmp_path / "bin", safe_serialization=False)  # a pickle: never loaded
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        DiffusionBackbone.from_diffusers(tmp_path / "bin")


# ---------------------------------------------------------------- pretraining


def test_pretraining_lowers_the_denoising_loss(tmp_path):
    data = images(8)
    losses: list[float] = []
    result = pretrain_backbone(
        data, tiny_config(), tmp_path / "bb", epochs=100, batch_size=8, lr=2e-3, max_steps=60,
        progress=False, log=lambda d: losses.append(d["loss"]),
    )
    assert result["steps"] == 60 and result["images"] == 8 and len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    assert result["final_loss"] == pytest.approx(sum(losses[-20:]) / 20)
    # the saved backbone (EMA weights) loads and works
    model = DiffusionBackbone.from_pretrained(tmp_path / "bb").freeze()
    assert model.features(data[:2])[0].shape == (2, 32, 32, 32)
    assert (tmp_path / "bb.resume" / "state.safetensors").is_file()  # kept: more steps continue the run
    assert not (tmp_path / "bb" / "checkpoint").exists()  # the backbone folder holds the backbone only


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return DiffusionBackbone.from_pretrained(directory).unet.state_dict()


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(tmp_path):
    data = images(6)
    kw = dict(config=tiny_config(), epochs=10, batch_size=4, lr=1e-3, progress=False)
    straight = pretrain_backbone(data, out_dir=tmp_path / "straight", max_steps=5, **kw)
    steps: list[int] = []
    first = pretrain_backbone(data, out_dir=tmp_path / "split", max_steps=3, **kw)
    second = pretrain_backbone(data, out_dir=tmp_path / "split", max_steps=5, log=lambda d: steps.append(d["step"]),
                               **kw)
    assert (straight["steps"], first["steps"], second["steps"]) == (5, 3, 5)
    assert second["resumed_from"] == 3 and steps == [4, 5]  # 6 images / batch 4 = 2 steps per epoch: resumes mid-epoch
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    fresh = pretrain_backbone(data, out_dir=tmp_path / "split", max_steps=2, resume=False, **kw)
    assert fresh["steps"] == 2 and fresh["resumed_from"] is None


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path, caplog):
    data = images(4)
    pretrain_backbone(data, tiny_config(), tmp_path / "bb", batch_size=4, max_steps=1, progress=False)
    with caplog.at_level(logging.INFO, logger="fasttextdiff.training.backbone"):
        result = pretrain_backbone(data, tiny_config(), tmp_path / "bb", batch_size=2, max_steps=2, progress=False)
    assert "discarding the resume state" in caplog.text and "batch_size" in caplog.text  # names what differs
    assert "resuming" not in caplog.text
    assert result["steps"] == 2 and result["resumed_from"] is None  # refused: started over, not resumed


def test_input_forms_are_equivalent_and_seeded(tmp_path):
    data = images(4)

    class DictDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"image": data[i], "name": f"img{i}"}

    kw = dict(config=tiny_config(), batch_size=2, max_steps=2, progress=False)
    pretrain_backbone(data, out_dir=tmp_path / "tensor", **kw)
    pretrain_backbone(DictDataset(), out_dir=tmp_path / "dicts", **kw)
    pretrain_backbone(list(data), out_dir=tmp_path / "list", **kw)
    pretrain_backbone(data, out_dir=tmp_path / "seed1", seed=1, **kw)
    a, b, c, d = (_weights(tmp_path / n) for n in ("tensor", "dicts", "list", "seed1"))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], d[k]) for k in a)


def test_pretraining_rejects_images_of_the_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        pretrain_backbone(torch.zeros(2, 1, 16, 16), tiny_config(), tmp_path / "bb", progress=False)
    with pytest.raises(ValueError, match="'image' key"):
        pretrain_backbone([{"img": torch.zeros(1, SIZE, SIZE)}], tiny_config(), tmp_path / "bb", progress=False)
    with pytest.raises(ValueError, match=r"image 1 has \(1, 16, 16\)"):  # a later item of another size
        pretrain_backbone([torch.zeros(1, SIZE, SIZE), torch.zeros(1, 16, 16)], tiny_config(), tmp_path / "bb",
                          batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\]"):  # raw 0..255 pixels
        pretrain_backbone(images(2) * 127.5 + 127.5, tiny_config(), tmp_path / "bb", progress=False)
    assert not (tmp_path / "bb").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):  # refused before training, not after
        pretrain_backbone(images(2), tiny_config(), tmp_path / "busy", progress=False)
    assert not (tmp_path / "busy" / "checkpoint").exists() and not (tmp_path / "busy.resume").exists()


def test_a_corrupt_training_checkpoint_is_reported_not_used(tmp_path, caplog):
    data = images(4)
    pretrain_backbone(data, tiny_config(), tmp_path / "bb", batch_size=4, max_steps=1, progress=False)
    state = tmp_path / "bb.resume" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-100])
    with caplog.at_level(logging.INFO, logger="fasttextdiff.training.backbone"):
        result = pretrain_backbone(data, tiny_config(), tmp_path / "bb", batch_size=4, max_steps=2, progress=False)
    assert "ignoring unreadable resume state" in caplog.text and "truncated or corrupt" in caplog.text
    assert "resuming" not in caplog.text
    assert result["steps"] == 2 and result["resumed_from"] is None  # not used: started over
    result = pretrain_backbone(data, tiny_config(), tmp_path / "bb", batch_size=4, max_steps=2, progress=False,
                               resume=False)
    assert result["steps"] == 2 and result["resumed_from"] is None


def test_diverging_pretraining_stops_with_a_sentence_and_saves_nothing(tmp_path):
    with pytest.raises(FastTextDiffError, match="diverged"):
        pretrain_backbone(images(4), tiny_config(), tmp_path / "bb", batch_size=4, lr=1e30, max_steps=20,
                          progress=False)
    assert not (tmp_path / "bb" / UNET_WEIGHTS_NAME).exists()


def test_stop_event_stops_after_the_current_step_and_saves(tmp_path):
    stop = threading.Event()

    def log(d):
        if d["step"] == 2:
            stop.set()

    result = pretrain_backbone(
        images(8), tiny_config(), tmp_path / "bb", epochs=50, batch_size=2, progress=False, log=log, stop_event=stop
    )
    assert result["stopped"] and result["steps"] == 2
    state = json.loads((tmp_path / "bb.resume" / "state.json").read_text(encoding="utf-8"))
    assert state["step"] == 2
    DiffusionBackbone.from_pretrained(tmp_path / "bb")


def test_pretraining_under_torch_distributed(tmp_path):
    """A one-process gloo group the caller initialised: the engine keeps it and trains (several
    processes: tests/library/test_engine.py)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        result = pretrain_backbone(images(4), tiny_config(), tmp_path / "bb", batch_size=2, max_steps=3,
                                   progress=False)
    finally:
        dist.destroy_process_group()
    assert result["steps"] == 3
    DiffusionBackbone.from_pretrained(tmp_path / "bb")


def test_pretraining_can_start_from_a_diffusers_checkpoint(tmp_path):
    """Domain adaptation of a public U-Net: its architecture is kept, its weights move."""
    unet = _foreign_unet()
    unet.save_pretrained(tmp_path / "public", safe_serialization=True)
    config = tiny_config(in_channels=3, timesteps=(30,))
    result = pretrain_backbone(images(4, channels=3), config, tmp_path / "bb", batch_size=2, max_steps=2,
                               progress=False, init=tmp_path / "public")
    assert result["steps"] == 2
    tuned = DiffusionBackbone.from_pretrained(tmp_path / "bb")
    assert tuned.config.block_out_channels == (8, 16, 16) and tuned.config.layers_per_block == 2
    assert tuned.config.timesteps == (30,) and tuned.unet.config.norm_num_groups == 4
    start = unet.conv_in.weight
    moved = tuned.unet.conv_in.weight
    assert not torch.equal(start, moved) and (start - moved).abs().max() < 0.1  # fine-tuned, not re-initialised
    frozen = DiffusionBackbone.from_diffusers(tmp_path / "public").freeze()  # a frozen backbone object also works
    pretrain_backbone(images(4, channels=3), config, tmp_path / "bb2", batch_size=2, max_steps=1, progress=False,
                      init=frozen)
    assert not torch.equal(DiffusionBackbone.from_pretrained(tmp_path / "bb2").unet.conv_in.weight, start)
    assert frozen.is_frozen  # the caller's object is untouched


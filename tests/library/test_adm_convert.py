"""guided-diffusion (ADM) checkpoints -> backbone directories, on state dicts laid out as ADM lays them out.

The ADM layouts here are written from our own knowledge of its key names and shapes (no guided-diffusion
code); the numerical match against guided-diffusion's own network was checked outside the repository
(see docs/ARCHITECTURE.md, "ADM backbones"). ADM's GroupNorm32 needs widths that are multiples of 32,
so the tiny models here are 32/64 channels wide at 32 px.
"""

from __future__ import annotations

import json

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from fasttextdiff.models.adm_taps import nearest_up_blocks, output_block_taps
from fasttextdiff.conversion.adm import (
    ADM_PRESETS,
    PAPER_TAPS,
    adm_layout,
    check_expressible,
    convert_state_dict,
    parse_adm_flags,
    unet_config,
)
from fasttextdiff.models.backbone import BACKBONE_CONFIG_NAME, UNET_WEIGHTS_NAME, load_backbone
from fasttextdiff.commands.main import main

TINY = ("--image_size 32 --num_channels 32 --channel_mult 1,2 --num_res_blocks 1 --attention_resolutions 16 "
        "--num_head_channels 16 --resblock_updown True --use_scale_shift_norm True --learn_sigma True")

FLAG_SETS = {
    "tiny": TINY,
    "conv-resample, added embedding, num_heads": (
        "--image_size 32 --num_channels 32 --channel_mult 1,2,2 --num_res_blocks 1 --attention_resolutions 16,8 "
        "--num_heads 2 --resblock_updown False --use_scale_shift_norm False"),
    "new attention order, three widths, class-conditional": (
        "--image_size 32 --num_channels 32 --channel_mult 1,2,3 --num_res_blocks 2 --attention_resolutions 16,8 "
        "--num_head_channels 32 --resblock_updown True --use_new_attention_order True --class_cond True "
        "--noise_schedule cosine --learn_sigma True"),
    "default channel_mult for 64 px, attention at three resolutions": (
        "--image_size 64 --num_channels 32 --num_res_blocks 1 --attention_resolutions 32,16,8 --num_head_channels 32"),
}


# ------------------------------------------------------------- ADM's layout, from our own knowledge


def _resblock(p: str, cin: int, cout: int, emb: int, scale_shift: bool) -> dict[str, tuple[int, ...]]:
    film = 2 * cout if scale_shift else cout
    out = {f"{p}.in_layers.0.weight": (cin,), f"{p}.in_layers.0.bias": (cin,),
           f"{p}.in_layers.2.weight": (cout, cin, 3, 3), f"{p}.in_layers.2.bias": (cout,),
           f"{p}.emb_layers.1.weight": (film, emb), f"{p}.emb_layers.1.bias": (film,),
           f"{p}.out_layers.0.weight": (cout,), f"{p}.out_layers.0.bias": (cout,),
           f"{p}.out_layers.3.weight": (cout, cout, 3, 3), f"{p}.out_layers.3.bias": (cout,)}
    if cin != cout:
        out |= {f"{p}.skip_connection.weight": (cout, cin, 1, 1), f"{p}.skip_connection.bias": (cout,)}
    return out


def _attention(p: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,), f"{p}.qkv.weight": (3 * c, c, 1),
            f"{p}.qkv.bias": (3 * c,), f"{p}.proj_out.weight": (c, c, 1), f"{p}.proj_out.bias": (c,)}


def _conv(p: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    return {f"{p}.weight": (cout, cin, 3, 3), f"{p}.bias": (cout,)}


def adm_keys(flags) -> dict[str, tuple[int, ...]]:
    """ADM's state-dict keys and shapes, following how its UNetModel constructor names and sizes modules."""
    c0, emb, nrb = flags.num_channels, 4 * flags.num_channels, flags.num_res_blocks
    mult = [int(m) for m in flags.multipliers]
    attn_ds = {flags.image_size // int(r) for r in flags.attention_resolutions.split(",")}
    ss = flags.use_scale_shift_norm
    keys = {"time_embed.0.weight": (emb, c0), "time_embed.0.bias": (emb,),
            "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,)}
    if flags.class_cond:
        keys["label_emb.weight"] = (1000, emb)
    ch = c0 * mult[0]
    keys |= _conv("input_blocks.0.0", 3, ch)
    chans, ds, n = [ch], 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            keys |= _resblock(f"input_blocks.{n}.0", ch, m * c0, emb, ss)
            ch = m * c0
            if ds in attn_ds:
                keys |= _attention(f"input_blocks.{n}.1", ch)
            chans.append(ch)
            n += 1
        if level != len(mult) - 1:
            keys |= (_resblock(f"input_blocks.{n}.0", ch, ch, emb, ss) if flags.resblock_updown
                     else _conv(f"input_blocks.{n}.0.op", ch, ch))
            chans.append(ch)
            ds *= 2
            n += 1
    keys |= _resblock("middle_block.0", ch, ch, emb, ss) | _attention("middle_block.1", ch)
    keys |= _resblock("middle_block.2", ch, ch, emb, ss)
    n = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nrb + 1):
            keys |= _resblock(f"output_blocks.{n}.0", ch + chans.pop(), m * c0, emb, ss)
            ch, layer = m * c0, 1
            if ds in attn_ds:
                keys |= _attention(f"output_blocks.{n}.1", ch)
                layer = 2
            if level and i == nrb:
                keys |= (_resblock(f"output_blocks.{n}.{layer}", ch, ch, emb, ss) if flags.resblock_updown
                         else _conv(f"output_blocks.{n}.{layer}.conv", ch, ch))
                ds //= 2
            n += 1
    keys |= {"out.0.weight": (ch,), "out.0.bias": (ch,)} | _conv("out.2", ch, 6 if flags.learn_sigma else 3)
    return keys


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct random values per tensor (norm scales near 1, weights ~ 1/sqrt(fan-in)) for a sane forward."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        t = torch.randn(shape, generator=g)
        if len(shape) > 1:
            t = t / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):
            t = 1 + 0.1 * t
        else:
            t = 0.1 * t
        state[key] = t
    return state


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adm") / "tiny_adm.pt"
    torch.save(random_state(adm_keys(parse_adm_flags(TINY))), path)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------- key mapping and shapes


def test_tiny_layout_written_out_by_hand():
    """One layout spelled out module by module, so the builder above is itself checked."""
    flags = parse_adm_flags(TINY)
    res = {"input_blocks.1.0": (32, 32), "input_blocks.2.0": (32, 32), "input_blocks.3.0": (32, 64),
           "middle_block.0": (64, 64), "middle_block.2": (64, 64), "output_blocks.0.0": (128, 64),
           "output_blocks.1.0": (96, 64), "output_blocks.1.2": (64, 64), "output_blocks.2.0": (96, 32),
           "output_blocks.3.0": (64, 32)}
    attn = {"input_blocks.3.1": 64, "middle_block.1": 64, "output_blocks.0.1": 64, "output_blocks.1.1": 64}
    expected = {"time_embed.0.weight": (128, 32), "time_embed.0.bias": (128,), "time_embed.2.weight": (128, 128),
                "time_embed.2.bias": (128,), "out.0.weight": (32,), "out.0.bias": (32,)}
    expected |= _conv("input_blocks.0.0", 3, 32) | _conv("out.2", 32, 6)
    for p, (cin, cout) in res.items():
        expected |= _resblock(p, cin, cout, 128, True)
    for p, c in attn.items():
        expected |= _attention(p, c)
    assert adm_keys(flags) == expected
    assert adm_layout(flags) == expected


@pytest.mark.parametrize("name", FLAG_SETS)
def test_every_adm_key_maps_onto_every_diffusers_key(name):
    flags = parse_adm_flags(FLAG_SETS[name])
    layout = adm_keys(flags)
    assert adm_layout(flags) == layout
    label = 3 if flags.class_cond else None
    converted, source = convert_state_dict(random_state(layout), flags, class_label=label)
    unet = UNet2DModel(**unet_config(flags))
    target = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == target  # every diffusers key, every shape
    assert {k for keys in source.values() for k in keys} == set(layout)  # every ADM key used
    unet.load_state_dict(converted, strict=True)
    assert sum(math.prod(s) for s in layout.values()) - (1000 * 4 * flags.num_channels if label is not None else 0) \
        == sum(p.numel() for p in unet.parameters())


def test_values_land_where_adm_uses_them():
    flags = parse_adm_flags(TINY)
    state = random_state(adm_keys(flags))
    converted, _ = convert_state_dict(state, flags)
    same = {
        "conv_in.weight": "input_blocks.0.0.weight",
        "time_embedding.linear_1.weight": "time_embed.0.weight",
        "down_blocks.0.downsamplers.0.conv1.weight": "input_blocks.2.0.in_layers.2.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.3.0.skip_connection.weight",
        "down_blocks.1.resnets.0.time_emb_proj.weight": "input_blocks.3.0.emb_layers.1.weight",
        "mid_block.resnets.1.norm2.bias": "middle_block.2.out_layers.0.bias",
        "up_blocks.0.resnets.1.conv1.weight": "output_blocks.1.0.in_layers.2.weight",
        "up_blocks.0.upsamplers.0.conv2.weight": "output_blocks.1.2.out_layers.3.weight",
        "up_blocks.1.resnets.0.norm1.weight": "output_blocks.2.0.in_layers.0.weight",
        "up_blocks.1.resnets.1.conv_shortcut.weight": "output_blocks.3.0.skip_connection.weight",
        "conv_norm_out.weight": "out.0.weight",
        "conv_out.weight": "out.2.weight",
    }
    for new, old in same.items():
        assert torch.equal(converted[new], state[old]), (new, old)
    assert torch.equal(converted["up_blocks.0.attentions.1.to_out.0.weight"],
                       state["output_blocks.1.1.proj_out.weight"][..., 0])


def _adm_attention(x, state, p, heads, new_order):
    """ADM's AttentionBlock from its definition: GroupNorm(32), fused 1x1 qkv, softmax(q k / sqrt(ch)) v,
    proj, residual."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    qkv = F.conv1d(F.group_norm(flat, 32, state[f"{p}.norm.weight"], state[f"{p}.norm.bias"], eps=1e-5),
                   state[f"{p}.qkv.weight"], state[f"{p}.qkv.bias"])
    ch = c // heads
    if new_order:  # [q | k | v], each head-major
        q, k, v = (t.reshape(b * heads, ch, h * w) for t in qkv.chunk(3, dim=1))
    else:  # per head [q_h | k_h | v_h]
        q, k, v = qkv.reshape(b * heads, 3 * ch, h * w).split(ch, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, h * w)
    return (flat + F.conv1d(a, state[f"{p}.proj_out.weight"], state[f"{p}.proj_out.bias"])).reshape(b, c, h, w)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy qkv order", "new qkv order"])
def test_attention_heads_and_qkv_order_compute_what_adm_computes(new_order):
    flags = parse_adm_flags(TINY + f" --use_new_attention_order {new_order}")
    state = random_state(adm_keys(flags), seed=1)
    converted, _ = convert_state_dict(state, flags)
    unet = UNet2DModel(**unet_config(flags))
    unet.load_state_dict(converted, strict=True)
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = unet.mid_block.attentions[0](x)
        want = _adm_attention(x, state, "middle_block.1", heads=64 // 16, new_order=new_order)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_timestep_embedding_is_adms_cos_then_sin():
    unet = UNet2DModel(**unet_config(parse_adm_flags(TINY)))
    t = torch.tensor([0, 7, 999])
    half = 16
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    torch.testing.assert_close(unet.time_proj(t), torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def test_class_label_is_folded_into_the_time_embedding():
    flags = parse_adm_flags(FLAG_SETS["new attention order, three widths, class-conditional"])
    state = random_state(adm_keys(flags))
    converted, _ = convert_state_dict(state, flags, class_label=5)
    torch.testing.assert_close(converted["time_embedding.linear_2.bias"],
                               state["time_embed.2.bias"] + state["label_emb.weight"][5])


# ------------------------------------------------------------- the paper's taps


def test_paper_taps_in_the_256_uncond_model():
    """The reference's output_blocks and their channels (1024, 512, 512, 256 | 512, 512, 256, 256)."""
    taps = output_block_taps(unet_config(parse_adm_flags(ADM_PRESETS["adm-256-uncond"])))
    assert len(taps) == 18
    where = {t.output_block: (t.module, t.channels, t.size) for t in taps}
    assert where[4] == ("up_blocks.1.attentions.1", 1024, 16)
    assert where[6] == ("up_blocks.2.attentions.0", 512, 32)
    assert where[8] == ("up_blocks.2.upsamplers.0", 512, 64)
    assert where[12] == ("up_blocks.4.resnets.0", 256, 128)
    assert where[16] == ("up_blocks.5.resnets.1", 256, 256)
    assert [t.output_block for t in taps if t.ends_up_block] == [2, 5, 8, 11, 14, 17]
    assert nearest_up_blocks([taps[k] for k in PAPER_TAPS["qata"]]) == (0, 1, 2, 3)
    assert nearest_up_blocks([taps[k] for k in PAPER_TAPS["monuseg"]]) == (1, 2, 3, 4)


def test_paper_preset_layouts_agree_at_full_size():
    """The paper's preset: ADM's layout and the diffusers model (built on the meta device) agree, 552.8M parameters."""
    flags = parse_adm_flags(ADM_PRESETS["adm-256-uncond"])
    with torch.device("meta"):
        unet = UNet2DModel(**unet_config(flags))
    n_adm = sum(math.prod(s) for s in adm_keys(flags).values())
    assert adm_layout(flags) == adm_keys(flags)
    assert n_adm == sum(p.numel() for p in unet.parameters()) == 552_814_086


def test_taps_are_the_modules_adm_output_blocks_end_in(tiny_checkpoint):
    """Hooked on a real forward, every tap has its declared shape; taps that end an up-block equal its output."""
    flags = parse_adm_flags(FLAG_SETS["conv-resample, added embedding, num_heads"])
    unet = UNet2DModel(**unet_config(flags)).eval()
    taps = output_block_taps(unet.config)
    assert len(taps) == 3 * 2
    seen, handles = {}, []
    for t in taps:
        handles.append(unet.get_submodule(t.module).register_forward_hook(
            lambda _m, _i, o, k=t.output_block: seen.__setitem__(k, o)))
    blocks = {}
    for i, block in enumerate(unet.up_blocks):
        handles.append(block.register_forward_hook(lambda _m, _i, o, i=i: blocks.__setitem__(i, o)))
    with torch.no_grad():
        unet(torch.randn(2, 3, 32, 32), torch.tensor([10, 500]))
    for h in handles:
        h.remove()
    for t in taps:
        assert tuple(seen[t.output_block].shape) == (2, t.channels, t.size, t.size)
        if t.ends_up_block:
            assert torch.equal(seen[t.output_block], blocks[t.up_block])


# ------------------------------------------------------------- refusals that need no file


@pytest.mark.parametrize(
    "flags, label, message",
    [
        (TINY + " --class_cond True", None, "class-conditional"),
        (TINY, 3, "only applies to class-conditional"),
        ("--image_size 512 --num_channels 64", None, "channel_mult starts at 0.5"),  # the 512 px model's layout
        ("--image_size 32 --num_channels 32 --channel_mult 1,2,3 --attention_resolutions 16,8 --num_heads 4", None,
         "one attention head width"),
        ("--image_size 32 --num_channels 48 --channel_mult 1,2", None, "multiples of 32"),
        (TINY + " --diffusion_steps 4000", None, "linear schedule"),
    ],
)
def test_inexpressible_flags_are_refused_with_the_reason(flags, label, message):
    with pytest.raises(ValueError, match=message):
        check_expressible(parse_adm_flags(flags), label)


@pytest.mark.parametrize("text, message",
                         [("--large_size 256", "super-resolution"), ("--batch_size 4", "unknown ADM flag"),
                                           ("--learn_sigma maybe", "True or False"), ("--image_size", "no value"),
                                           ("image_size 64", "not a flag name"),
                                           ("--channel_mult 1,1.5", "comma-separated integers"),
                                           ("--attention_resolutions 16,0", "must be positive"),
                                           ("--num_heads 0", "num_heads must be positive")])
def test_bad_flag_text_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        check_expressible(parse_adm_flags(text))


def test_flags_use_guided_diffusions_defaults_and_forms():
    flags = parse_adm_flags("--image_size=256 --learn_sigma t --num-channels 64")
    assert (flags.image_size, flags.learn_sigma, flags.num_channels) == (256, True, 64)
    assert flags.multipliers == (1, 1, 2, 2, 4, 4) and flags.num_heads == 4 and flags.use_scale_shift_norm
    assert flags.attention_levels == frozenset({4, 5})  # "16,8" at 256 px: downsampling rates 16 and 32


# ------------------------------------------------------------- the command


def test_convert_backbone_writes_a_loadable_backbone(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "adm-backbone"
    code, stdout, err = run_cli(capsys, "convert-backbone", tiny_checkpoint, "--adm-flags", TINY, "--out", out,
                                "--taps", "1,2,3", "--timesteps", "50,150")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checksums.json", "config.json", BACKBONE_CONFIG_NAME, UNET_WEIGHTS_NAME])
    assert not [p for p in tmp_path.iterdir() if p != out]  # no staging leftovers
    unet = UNet2DModel.from_pretrained(out)
    assert unet.config.out_channels == 6 and unet.config.resnet_time_scale_shift == "scale_shift"
    converted, _ = convert_state_dict(torch.load(tiny_checkpoint, weights_only=True), parse_adm_flags(TINY))
    for key, value in unet.state_dict().items():
        assert torch.equal(value, converted[key]), key
    backbone = load_backbone(out)
    assert backbone.config.timesteps == (50, 150) and backbone.config.in_channels == 3
    assert backbone.config.feature_taps == (1, 2, 3) and backbone.config.feature_blocks == ()
    # tap 1 is up-block 0's upsampler (64 ch), 2 and 3 up-block 1's resnets (32 ch); two timesteps each
    assert backbone.feature_modules == ["up_blocks.0.upsamplers.0", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]
    feats = backbone.freeze().features(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert [tuple(f.shape) for f in feats] == [(1, 128, 32, 32), (1, 64, 32, 32), (1, 64, 32, 32)]
    assert '"output_block": 2' in stdout and '"module": "up_blocks.0.upsamplers.0"' in stdout


def _refused(capsys, checkpoint, out, *extra) -> str:
    code, stdout, err = run_cli(capsys, "convert-backbone", checkpoint, "--out", out, *extra)
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


class _Sentinel:
    """Unpickling this would create a file: proof that the loader never runs pickled code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", "could not be read as a PyTorch state dict"),
        ("not a state dict", "not a state dict"),
        ("pickled object", "could not be read as a PyTorch state dict"),
        ("missing key", "missing"),
        ("extra key", "not part of this architecture"),
        ("wrong shape", "shape(s) differ"),
        ("other flags", "does not match the given ADM flags"),
        ("class-conditional without a label", "class-conditional"),
        ("nan weights", "NaN"),
        ("no such file", "does not exist"),
    ],
)
def test_bad_checkpoints_are_refused_and_nothing_is_written(case, message, tmp_path, tiny_checkpoint, capsys):
    flags = TINY
    state = torch.load(tiny_checkpoint, weights_only=True)
    sentinel = tmp_path / "pickle-ran"
    bad = tmp_path / "bad.pt"
    if case == "truncated":
        data = tiny_checkpoint.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif case == "not a state dict":
        _save(bad, list(state.values()))
    elif case == "pickled object":
        _save(bad, {"model": _Sentinel(sentinel)})
    elif case == "missing key":
        state.pop("output_blocks.1.2.emb_layers.1.weight")
        _save(bad, state)
    elif case == "extra key":
        state["output_blocks.9.0.in_layers.0.weight"] = torch.ones(32)
        _save(bad, state)
    elif case == "wrong shape":
        state["middle_block.1.qkv.weight"] = torch.ones(3 * 64, 64, 3)
        _save(bad, state)
    elif case == "other flags":
        _save(bad, state)
        flags = TINY.replace("--num_channels 32", "--num_channels 64")
    elif case == "class-conditional without a label":
        _save(bad, state)
        flags = TINY + " --class_cond True"
    elif case == "nan weights":
        state["out.2.bias"][0] = float("nan")
        _save(bad, state)
    else:
        bad = tmp_path / "absent.pt"
    out = tmp_path / "out"
    line = _refused(capsys, bad, out, "--adm-flags", flags, "--taps", "1,2")
    assert message in line
    assert not sentinel.exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"bad.pt"}  # no output, no staging leftovers


def test_a_failed_conversion_leaves_an_existing_backbone_untouched(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "backbone"
    assert run_cli(capsys, "convert-backbone", tiny_checkpoint, "--adm-flags", TINY, "--out", out, "--taps",
                   "2")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = _save(tmp_path / "bad.pt", {"time_embed.0.weight": torch.ones(128, 32)})
    _refused(capsys, bad, out, "--adm-flags", TINY, "--taps", "2")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _refused(capsys, tiny_checkpoint, out, "--adm-flags", TINY, "--taps", "4")  # no output block 4 in this model
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_and_segment_on_a_converted_adm_backbone(tmp_path, tiny_checkpoint, tiny_dataset, capsys):
    """The converted folder is a backbone like any other: grayscale images are repeated to ADM's 3 channels."""
    backbone = tmp_path / "adm"
    assert run_cli(capsys, "convert-backbone", tiny_checkpoint, "--adm-flags", TINY, "--out", backbone,
                   "--taps", "2", "--timesteps", "50")[0] == 0
    model = tmp_path / "model"
    code, _, err = run_cli(capsys, "train", "--data", tiny_dataset, "--backbone", backbone, "--out", model,
                           "--epochs", "1", "--batch-size", "4", "--fusion-dim", "16", "--heads", "2",
                           "--head-channels", "8", "--device", "cpu", "--text-focus", "Opacity in the lung.",
                           "--text-focus-sentences", "2")
    assert code == 0, err
    # the focus travels with the model: segment reads reports the way training did
    reference = json.loads((model / "text_encoder.json").read_text())["config"]
    assert (reference["focus"], reference["focus_sentences"]) == ("Opacity in the lung.", 2)
    image = sorted((tiny_dataset / "Test_Folder" / "img").iterdir())[0]
    code, stdout, err = run_cli(capsys, "segment", image, "--report", "Unilateral pulmonary infection, one infected "
                                "area, upper left lung.", "--model", model, "--out", tmp_path / "mask.png",
                                "--n-noise", "1", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "mask.png").is_file()

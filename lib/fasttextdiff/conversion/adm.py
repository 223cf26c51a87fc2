"""OpenAI guided-diffusion (ADM) checkpoints as our backbone: flags -> UNet2DModel config, weights -> diffusers keys.

Why: TextDiff/FastTextDiff take their features from ADM's ``256x256_diffusion_uncond.pt``. diffusers'
``UNet2DModel`` expresses the same network (scale-shift resnets, resnet up/down-sampling, multi-head
attention), so once converted the checkpoint saves, loads and runs like any other backbone here, and
nothing of guided-diffusion (code or pickles) is needed at run time.

The correspondence between the two layouts is kept as data (``module_plan``: one row per ADM module,
naming its diffusers counterpart), from which the expected ADM keys and shapes, the key renaming and
the tap points in ADM's ``output_blocks`` numbering (``models.adm_taps``) agree with. A checkpoint
converts only if every one of its keys and shapes is accounted for: no silent partial loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from fasttextdiff.models.adm_taps import output_block_taps
from fasttextdiff.utils.errors import CheckpointError, ModelNotFoundError
from fasttextdiff.experiments.paper import PAPER_TAPS

__all__ = [
    "ADM_PRESETS",
    "PAPER_TAPS",
    "AdmFlags",
    "parse_adm_flags",
    "unet_config",
    "module_plan",
    "adm_layout",
    "convert_state_dict",
    "load_adm_state_dict",
    "convert_adm_checkpoint",
]

# guided-diffusion's published MODEL_FLAGS (its README), for the checkpoints our backbone can express.
ADM_PRESETS: dict[str, str] = {
    # the paper's backbone: 256x256_diffusion_uncond.pt
    "adm-256-uncond": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    # lsun_bedroom.pt, lsun_cat.pt, lsun_horse.pt, lsun_horse_nodropout.pt (dropout only matters in training)
    "adm-lsun-256": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    # 256x256_diffusion.pt (class-conditional: needs --class-label)
    "adm-256-cond": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    # 64x64_diffusion.pt (class-conditional: needs --class-label)
    "adm-64-cond": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
    "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 "
    "--num_res_blocks 3 --resblock_updown True --use_new_attention_order True --use_fp16 True "
    "--use_scale_shift_norm True",
}

# The reference configs' taps, in ADM's output_blocks numbering (siddharthdhara/FastTextDiff ddpm.json).

NUM_CLASSES = 1000  # guided-diffusion's class-conditional models are ImageNet's
_NORM_GROUPS = 32  # ADM's GroupNorm32 always has 32 groups
_NORM_EPS = 1e-5  # torch's GroupNorm default, which ADM keeps


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdmFlags:
    """guided-diffusion's model and diffusion flags; defaults are its ``model_and_diffusion_defaults()``.

    The defaults matter: the published commands leave some flags out (e.g. ``num_heads``,
    ``use_new_attention_order``) and rely on the script's defaults.
    """

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1
    num_head_channels: int = -1
    attention_resolutions: str = "16,8"
    channel_mult: str = ""
    dropout: float = 0.0
    class_cond: bool = False
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_fp16: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    timestep_respacing: str = ""
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = False
    rescale_learned_sigmas: bool = False

    # -- derived architecture ------------------------------------------------------------------

    @property
    def multipliers(self) -> tuple[float, ...]:
        """channel_mult, or guided-diffusion's default for the image size."""
        if self.channel_mult:  # ADM reads integers here; only its own 512 px default has a 0.5
            try:
                return tuple(float(int(m)) for m in self.channel_mult.split(","))
            except ValueError:
                raise ValueError(f"--channel_mult takes comma-separated integers, got {self.channel_mult!r}") from None
        defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        if self.image_size not in defaults:
            raise ValueError(f"ADM has no default --channel_mult for --image_size {self.image_size}; pass "
                             "--channel_mult")
        return tuple(float(m) for m in defaults[self.image_size])

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of every level (ADM truncates mult * num_channels to an int)."""
        return tuple(int(m * self.num_channels) for m in self.multipliers)

    @property
    def attention_levels(self) -> frozenset[int]:
        """Levels (0 = full resolution) with self-attention: those whose downsampling rate is listed."""
        try:
            resolutions = [int(r) for r in self.attention_resolutions.split(",") if r.strip()]
        except ValueError:
            raise ValueError("--attention_resolutions takes comma-separated integers (pixels), "
                             f"got {self.attention_resolutions!r}") from None
        if any(r <= 0 for r in resolutions):
            raise ValueError(f"--attention_resolutions must be positive, got {self.attention_resolutions!r}")
        rates = {self.image_size // r for r in resolutions}
        return frozenset(level for level in range(len(self.widths)) if 2**level in rates)

    @property
    def out_channels(self) -> int:
        """6 with learn_sigma (epsilon and the variance interpolation, 3 each), else 3."""
        return 6 if self.learn_sigma else 3

    def head_dims(self) -> dict[str, int]:
        """Channels per attention head of every attention layer group (down, mid, up)."""
        widths, levels = self.widths, self.attention_levels

        def dim(width: int, heads: int) -> int:
            if self.num_head_channels != -1:
                return self.num_head_channels
            return width // heads

        up_heads = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        dims = {f"down level {lv}": dim(widths[lv], self.num_heads) for lv in sorted(levels)}
        dims["middle"] = dim(widths[-1], self.num_heads)
        dims.update({f"up level {lv}": dim(widths[lv], up_heads) for lv in sorted(levels)})
        return dims


_BOOL_TRUE = {"yes", "true", "t", "y", "1"}
_BOOL_FALSE = {"no", "false", "f", "n", "0"}


def _flag_value(name: str, kind: type, text: str) -> Any:
    if kind is bool:  # guided-diffusion's str2bool
        if text.lower() in _BOOL_TRUE:
            return True
        if text.lower() in _BOOL_FALSE:
            return False
        raise ValueError(f"--{name} takes True or False, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{name} takes {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def parse_adm_flags(text: str | Sequence[str]) -> AdmFlags:
    """guided-diffusion command-line flags (``"--image_size 256 --learn_sigma True ..."``) -> AdmFlags.

    Unknown flags are refused rather than ignored: a sampling or super-resolution flag means the
    caller has the wrong model in mind.
    """
    tokens = shlex.split(text) if isinstance(text, str) else list(text)
    kinds = {f.name: {"int": int, "float": float, "bool": bool, "str": str}[f.type] for f in fields(AdmFlags)}
    values: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ValueError(f"ADM flags are '--name value' pairs; {token!r} is not a flag name")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ValueError(f"ADM flag --{name} has no value")
            value = tokens[i + 1]
            i += 1
        i += 1
        name = name.replace("-", "_")
        if name not in kinds:
            hint = " (super-resolution models are not supported)" if name in ("large_size", "small_size") else ""
            raise ValueError(f"unknown ADM flag --{name}{hint}; pass guided-diffusion's MODEL_FLAGS only, "
                             f"known: {', '.join('--' + k for k in kinds)}")
        values[name] = _flag_value(name, kinds[name], value)
    return AdmFlags(**values)


def check_expressible(flags: AdmFlags, class_label: int | None = None) -> None:
    """Refuse, with the reason, ADM variants that diffusers' UNet2DModel or our backbone cannot express."""
    if flags.image_size <= 0 or flags.num_channels <= 0 or flags.num_res_blocks <= 0 or flags.diffusion_steps <= 0:
        raise ValueError("--image_size, --num_channels, --num_res_blocks and --diffusion_steps must be positive")
    if flags.num_head_channels == -1 and flags.num_heads <= 0:
        raise ValueError(f"--num_heads must be positive when --num_head_channels is -1, got {flags.num_heads}")
    if flags.num_head_channels != -1 and flags.num_head_channels <= 0:
        raise ValueError(f"--num_head_channels must be positive or -1, got {flags.num_head_channels}")
    if flags.num_head_channels == -1 and flags.num_heads_upsample != -1 and flags.num_heads_upsample <= 0:
        raise ValueError(f"--num_heads_upsample must be positive or -1, got {flags.num_heads_upsample}")
    widths = flags.widths
    _ = flags.attention_levels  # parses --attention_resolutions, refusing bad values
    if flags.class_cond and class_label is None:
        raise ValueError(
            "this checkpoint is class-conditional (--class_cond True) and our backbone takes no class labels; "
            f"pass --class-label N (0-{NUM_CLASSES - 1}) to fix one ImageNet class, or use an unconditional "
            "checkpoint such as 256x256_diffusion_uncond.pt"
        )
    if class_label is not None and not flags.class_cond:
        raise ValueError("--class-label only applies to class-conditional checkpoints (--class_cond True)")
    if class_label is not None and not 0 <= class_label < NUM_CLASSES:
        raise ValueError(f"--class-label must be in 0..{NUM_CLASSES - 1}, got {class_label}")
    if not widths or min(widths) <= 0:
        raise ValueError(f"--channel_mult must give positive widths, got {list(widths)}")
    if flags.multipliers[0] != 1:
        raise ValueError(
            f"--channel_mult starts at {flags.multipliers[0]:g}: ADM then embeds timesteps at {flags.num_channels} "
            f"channels but the first level has {widths[0]}, which diffusers' UNet2DModel cannot express "
            "(the 512x512 model has this layout)"
        )
    bad = [w for w in widths if w % _NORM_GROUPS]
    if bad:
        raise ValueError(f"ADM level widths must be multiples of 32 (GroupNorm32), got {list(widths)}")
    if flags.image_size % 2 ** (len(widths) - 1):
        raise ValueError(f"--image_size {flags.image_size} is not divisible by 2^{len(widths) - 1} "
                         f"for {len(widths)} levels")
    dims = flags.head_dims()
    if len(set(dims.values())) != 1:
        listing = ", ".join(f"{k}: {v}" for k, v in dims.items())
        raise ValueError(
            "diffusers' UNet2DModel uses one attention head width for every block, but these flags give "
            f"different ones ({listing}); this happens with --num_heads and unequal widths (the 128x128 model)"
        )
    for group, width in [("middle", widths[-1])] + [(f"level {lv}",
                                                     widths[lv]) for lv in sorted(flags.attention_levels)]:
        if width % next(iter(dims.values())):
            raise ValueError(f"attention in the {group} has {width} channels, not divisible by the head width")
    if flags.noise_schedule not in ("linear", "cosine"):
        raise ValueError(f"--noise_schedule must be linear or cosine, got {flags.noise_schedule!r}")
    if flags.noise_schedule == "linear" and flags.diffusion_steps != 1000:
        raise ValueError(
            "ADM scales its linear schedule by 1000/--diffusion_steps; our backbone's linear schedule equals it "
            f"only for 1000 steps, not {flags.diffusion_steps}"
        )
    if flags.rescale_timesteps and flags.diffusion_steps != 1000:
        raise ValueError("--rescale_timesteps True with --diffusion_steps other than 1000 feeds the network "
                         "rescaled timesteps, which our backbone does not do")


# --------------------------------------------------------------------------------------------
# The correspondence, as data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleRow:
    """One ADM module and its diffusers counterpart (prefixes of their state-dict keys)."""

    adm: str
    diffusers: str
    kind: str  # "linear", "conv3" (3x3 conv), "norm", "resnet", "attention", "embedding"
    channels_in: int
    channels_out: int


def module_plan(flags: AdmFlags) -> list[ModuleRow]:
    """Every ADM module in state-dict order, with the diffusers module that holds its weights.

    ADM's ``input_blocks`` are conv_in, then per level its res blocks (+ attention) and, except at the
    last level, a downsampler; diffusers groups a level into ``down_blocks[level]`` (resnets,
    attentions, downsamplers.0). ``output_blocks`` run coarse -> fine with one more res block per
    level, the upsampler inside the level's last block; diffusers' ``up_blocks[i]`` is level L-1-i.
    """
    widths, levels, nrb = flags.widths, flags.attention_levels, flags.num_res_blocks
    c0, emb = widths[0], 4 * flags.num_channels
    rows = [
        ModuleRow("time_embed.0", "time_embedding.linear_1", "linear", flags.num_channels, emb),
        ModuleRow("time_embed.2", "time_embedding.linear_2", "linear", emb, emb),
    ]
    if flags.class_cond:
        rows.append(ModuleRow("label_emb", "class_embedding", "embedding", NUM_CLASSES, emb))
    rows.append(ModuleRow("input_blocks.0.0", "conv_in", "conv3", 3, c0))
    skips, ch, k = [c0], c0, 1
    for level, width in enumerate(widths):
        for j in range(nrb):
            rows.append(ModuleRow(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", "resnet", ch, width))
            if level in levels:
                rows.append(ModuleRow(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", "attention", width,
                                      width))
            ch = width
            skips.append(ch)
            k += 1
        if level != len(widths) - 1:
            if flags.resblock_updown:
                rows.append(ModuleRow(f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", "resnet", ch, ch))
            else:
                rows.append(ModuleRow(f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "conv3",
                                      ch, ch))
            skips.append(ch)
            k += 1
    rows += [
        ModuleRow("middle_block.0", "mid_block.resnets.0", "resnet", ch, ch),
        ModuleRow("middle_block.1", "mid_block.attentions.0", "attention", ch, ch),
        ModuleRow("middle_block.2", "mid_block.resnets.1", "resnet", ch, ch),
    ]
    k = 0
    for i, level in enumerate(reversed(range(len(widths)))):
        width = widths[level]
        for j in range(nrb + 1):
            rows.append(ModuleRow(f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "resnet", ch + skips.pop(),
                                  width))
            ch, layer = width, 1
            if level in levels:
                rows.append(ModuleRow(f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attention", ch, ch))
                layer = 2
            if level and j == nrb:
                if flags.resblock_updown:
                    rows.append(ModuleRow(f"output_blocks.{k}.{layer}", f"up_blocks.{i}.upsamplers.0", "resnet", ch,
                                          ch))
                else:
                    rows.append(ModuleRow(f"output_blocks.{k}.{layer}.conv", f"up_blocks.{i}.upsamplers.0.conv",
                                          "conv3", ch, ch))
            k += 1
    rows += [
        ModuleRow("out.0", "conv_norm_out", "norm", c0, c0),
        ModuleRow("out.2", "conv_out", "conv3", c0, flags.out_channels),
    ]
    return rows


# (ADM suffix, diffusers suffix) per module kind; the attention's qkv is split three ways (see _attention).
_RESNET_KEYS = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]


def _row_layout(row: ModuleRow, flags: AdmFlags) -> dict[str, tuple[int, ...]]:
    """ADM's key -> shape for one module."""
    p, cin, cout = row.adm, row.channels_in, row.channels_out
    if row.kind == "linear":
        return {f"{p}.weight": (cout, cin), f"{p}.bias": (cout,)}
    if row.kind == "embedding":
        return {f"{p}.weight": (cin, cout)}
    if row.kind == "conv3":
        return {f"{p}.weight": (cout, cin, 3, 3), f"{p}.bias": (cout,)}
    if row.kind == "norm":
        return {f"{p}.weight": (cout,), f"{p}.bias": (cout,)}
    if row.kind == "attention":
        c = cout
        return {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,), f"{p}.qkv.weight": (3 * c, c, 1),
                f"{p}.qkv.bias": (3 * c,), f"{p}.proj_out.weight": (c, c, 1), f"{p}.proj_out.bias": (c,)}
    assert row.kind == "resnet", row.kind
    emb, film = 4 * flags.num_channels, 2 if flags.use_scale_shift_norm else 1
    shapes = {
        f"{p}.in_layers.0.weight": (cin,), f"{p}.in_layers.0.bias": (cin,),
        f"{p}.in_layers.2.weight": (cout, cin, 3, 3), f"{p}.in_layers.2.bias": (cout,),
        f"{p}.emb_layers.1.weight": (film * cout, emb), f"{p}.emb_layers.1.bias": (film * cout,),
        f"{p}.out_layers.0.weight": (cout,), f"{p}.out_layers.0.bias": (cout,),
        f"{p}.out_layers.3.weight": (cout, cout, 3, 3), f"{p}.out_layers.3.bias": (cout,),
    }
    if cin != cout:  # ADM's 1x1 skip projection (use_conv=False)
        shapes.update({f"{p}.skip_connection.weight": (cout, cin, 1, 1), f"{p}.skip_connection.bias": (cout,)})
    return shapes


def adm_layout(flags: AdmFlags) -> dict[str, tuple[int, ...]]:
    """Every key of an ADM state dict with these flags, and its shape."""
    layout: dict[str, tuple[int, ...]] = {}
    for row in module_plan(flags):
        layout.update(_row_layout(row, flags))
    return layout


def _split_qkv(w: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ADM's fused qkv rows -> q, k, v rows in diffusers' head-major order.

    Legacy order (the default) interleaves per head: [q_h, k_h, v_h] for h = 0..H-1; the new order
    (--use_new_attention_order) stacks [q, k, v], each head-major. Works for weights and biases.
    """
    rest = w.shape[1:]
    c = w.shape[0] // 3
    if new_order:
        q, k, v = w.reshape(3, c, *rest).unbind(0)
    else:
        q, k, v = w.reshape(heads, 3, c // heads, *rest).unbind(1)
    return tuple(t.reshape(c, *rest).contiguous() for t in (q, k, v))  # type: ignore[return-value]


def convert_state_dict(
    state: dict[str, torch.Tensor], flags: AdmFlags, class_label: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, ...]]]:
    """ADM state dict -> (diffusers UNet2DModel state dict, diffusers key -> the ADM keys it came from).

    Refuses (CheckpointError) unless the keys are exactly those these flags imply and every shape matches.
    With ``class_label`` the label embedding row is folded into the time embedding's last bias:
    ADM adds ``label_emb(y)`` to ``time_embed(t)``, so for a fixed y this is exact.
    """
    check_expressible(flags, class_label)
    layout = adm_layout(flags)
    missing = [k for k in layout if k not in state]
    extra = sorted(k for k in state if k not in layout)
    wrong = [f"{k} {tuple(state[k].shape)} (expected {layout[k]})" for k in layout
             if k in state and tuple(state[k].shape) != layout[k]]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) these flags need are missing (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} key(s) are not part of this architecture (e.g. {', '.join(extra[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape(s) differ (e.g. {'; '.join(wrong[:3])})")
        raise CheckpointError(
            "the checkpoint does not match the given ADM flags: " + "; ".join(parts)
            + "; check the flags against the checkpoint's published MODEL_FLAGS"
        )
    heads_dim = next(iter(flags.head_dims().values()))
    out: dict[str, torch.Tensor] = {}
    source: dict[str, tuple[str, ...]] = {}

    def put(new: str, value: torch.Tensor, *old: str) -> None:
        out[new] = value.detach().to(torch.float32).contiguous()
        source[new] = old

    for row in module_plan(flags):
        a, d = row.adm, row.diffusers
        if row.kind in ("linear", "conv3", "norm"):
            for s in ("weight", "bias"):
                put(f"{d}.{s}", state[f"{a}.{s}"], f"{a}.{s}")
        elif row.kind == "embedding":  # class_label is set (check_expressible refused otherwise)
            folded = state["time_embed.2.bias"].float() + state[f"{a}.weight"][class_label].float()
            put("time_embedding.linear_2.bias", folded, "time_embed.2.bias", f"{a}.weight")
        elif row.kind == "resnet":
            for old_s, new_s in _RESNET_KEYS:
                if f"{a}.{old_s}.weight" in layout:
                    for s in ("weight", "bias"):
                        put(f"{d}.{new_s}.{s}", state[f"{a}.{old_s}.{s}"], f"{a}.{old_s}.{s}")
        else:  # attention: ADM's 1x1 Conv1d weights become Linear weights
            heads = row.channels_out // heads_dim
            for s in ("weight", "bias"):
                squeeze = (lambda t: t.squeeze(-1)) if s == "weight" else (lambda t: t)
                q, k, v = _split_qkv(state[f"{a}.qkv.{s}"], heads, flags.use_new_attention_order)
                for name, t in (("to_q", q), ("to_k", k), ("to_v", v)):
                    put(f"{d}.{name}.{s}", squeeze(t), f"{a}.qkv.{s}")
                put(f"{d}.group_norm.{s}", state[f"{a}.norm.{s}"], f"{a}.norm.{s}")
                put(f"{d}.to_out.0.{s}", squeeze(state[f"{a}.proj_out.{s}"]), f"{a}.proj_out.{s}")
    unused = sorted(set(layout) - {k for old in source.values() for k in old})
    if unused:  # a planning bug, never a user error
        raise AssertionError(f"ADM keys left unconverted: {unused[:5]}")
    return out, source


def unet_config(flags: AdmFlags) -> dict[str, Any]:
    """diffusers UNet2DModel arguments that reproduce ADM's network exactly (see module_plan).

    - timesteps: ADM embeds [cos, sin] with frequencies exp(-ln(10^4) i / half) -> flip_sin_to_cos=True,
      freq_shift=0 ("positional"); the input is used as given (center_input_sample=False).
    - resnets: scale-shift (FiLM) norm with use_scale_shift_norm, else added embedding; GroupNorm(32, eps 1e-5).
    - resblock_updown: resnet down/up-samplers (avg-pool / nearest inside the block) instead of convs.
    - attention: one head width everywhere; the mid block always has attention, with GroupNorm(32).
    - learn_sigma: out_channels 6 (epsilon in 0:3, variance interpolation in 3:6), as ADM outputs.
    """
    levels, n = flags.attention_levels, len(flags.widths)
    plain_down = "ResnetDownsampleBlock2D" if flags.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if flags.resblock_updown else "UpBlock2D"
    return {
        "sample_size": flags.image_size,
        "in_channels": 3,
        "out_channels": flags.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": tuple("AttnDownBlock2D" if lv in levels else plain_down for lv in range(n)),
        "up_block_types": tuple("AttnUpBlock2D" if (n - 1 - i) in levels else plain_up for i in range(n)),
        "block_out_channels": flags.widths,
        "layers_per_block": flags.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if flags.resblock_updown else "conv",
        "upsample_type": "resnet" if flags.resblock_updown else "conv",
        "dropout": flags.dropout,
        "act_fn": "silu",
        "attention_head_dim": next(iter(flags.head_dims().values())),
        "norm_num_groups": _NORM_GROUPS,
        "attn_norm_num_groups": _NORM_GROUPS,
        "norm_eps": _NORM_EPS,
        "resnet_time_scale_shift": "scale_shift" if flags.use_scale_shift_norm else "default",
        "add_attention": True,
        "num_train_timesteps": flags.diffusion_steps,
    }


# --------------------------------------------------------------------------------------------
# Reading the .pt and writing the backbone
# --------------------------------------------------------------------------------------------


def load_adm_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors via ``torch.load(weights_only=True)``: a pickle that names any other object fails."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"ADM checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling and zip errors come in many types; all mean "unreadable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} could not be read as a PyTorch state dict (truncated, corrupt, or holding more than "
            f"tensors): {first}"
        ) from exc
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors "
                              "(guided-diffusion saves model.state_dict())")
    not_tensors = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        raise CheckpointError(f"{path} is not a plain state dict: {len(not_tensors)} entries are not tensors "
                              f"(e.g. {not_tensors[:3]})")
    broken = [k for k, v in state.items() if not v.is_floating_point() or not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{path} holds non-float, NaN or infinite weights ({broken[:3]})")
    return state


def convert_adm_checkpoint(
    checkpoint: str | os.PathLike,
    flags: AdmFlags | str,
    out_dir: str | os.PathLike,
    taps: Sequence[int] = PAPER_TAPS["qata"],
    timesteps: Sequence[int] = (50, 150, 250),
    class_label: int | None = None,
) -> dict[str, Any]:
    """Convert a guided-diffusion checkpoint into a backbone directory; returns a summary.

    The directory is what ``DiffusionBackbone.save_pretrained`` writes (atomically): diffusers'
    config.json + diffusion_pytorch_model.safetensors (loads with ``UNet2DModel.from_pretrained``),
    backbone_config.json and checksums.json, so ``load_backbone(out_dir)`` and ``train --backbone``
    take it. ``taps`` (ADM output_blocks) become the config's ``feature_taps``: the backbone hooks exactly
    those modules (listed in the summary) and stops the forward after the last.
    """
    from diffusers import UNet2DModel

    from fasttextdiff.models.backbone import DiffusionBackbone
    from fasttextdiff.config import BackboneConfig

    flags = parse_adm_flags(flags) if isinstance(flags, str) else flags
    check_expressible(flags, class_label)
    config = unet_config(flags)
    all_taps = output_block_taps(config)
    bad = [t for t in taps if not 0 <= int(t) < len(all_taps)]
    if bad or not taps:
        raise ValueError(f"taps {list(bad) or '(none)'} are not ADM output blocks of this model "
                         f"(it has output_blocks 0..{len(all_taps) - 1})")
    chosen = [all_taps[int(t)] for t in sorted(set(int(t) for t in taps))]
    backbone_config = BackboneConfig(
        image_size=flags.image_size,
        in_channels=3,
        block_out_channels=flags.widths,
        layers_per_block=flags.num_res_blocks,
        attention=bool(flags.attention_levels),
        num_train_timesteps=flags.diffusion_steps,
        beta_schedule="linear" if flags.noise_schedule == "linear" else "squaredcos_cap_v2",
        timesteps=tuple(int(t) for t in timesteps),
        feature_taps=tuple(t.output_block for t in chosen),
    )

    state = load_adm_state_dict(checkpoint)
    converted, _ = convert_state_dict(state, flags, class_label)
    del state
    with torch.device("meta"):  # no random init of ~550M parameters only to overwrite them
        unet = UNet2DModel(**config)
    try:
        unet.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the converted weights do not fit UNet2DModel: {exc}") from exc
    on_meta = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if on_meta:  # a diffusers version with state the checkpoint cannot provide
        raise CheckpointError(f"the converted UNet2DModel has tensors no ADM weight fills: {on_meta[:3]}")
    backbone = DiffusionBackbone(backbone_config, unet=unet.eval())
    backbone.save_pretrained(out_dir)
    return {
        "out": str(out_dir),
        "image_size": flags.image_size,
        "block_out_channels": list(flags.widths),
        "out_channels": flags.out_channels,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "class_label": class_label,
        "timesteps": list(backbone_config.timesteps),
        "taps": [asdict(t) for t in chosen],
        "feature_taps": list(backbone_config.feature_taps),
    }


# --------------------------------------------------------------------------------------------
# CLI: fasttextdiff convert-backbone
# --------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_convert_backbone_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("checkpoint", type=Path,
                   help="a guided-diffusion .pt state dict (e.g. 256x256_diffusion_uncond.pt)")
    arch = p.add_mutually_exclusive_group(required=True)
    arch.add_argument("--arch", choices=sorted(ADM_PRESETS), help="published flags of a guided-diffusion model")
    arch.add_argument("--adm-flags",
                      help='the model\'s guided-diffusion MODEL_FLAGS, e.g. "--image_size 64 --num_channels 128 ..."')
    p.add_argument("--out", required=True, type=Path, help="backbone directory to write")
    p.add_argument("--taps", type=_ints, default=PAPER_TAPS["qata"],
                   help="ADM output_blocks to tap (default 4,6,8,12 as for QaTa/MosMedData+; MoNuSeg: 6,8,12,16)")
    p.add_argument("--timesteps", type=_ints, default=(50, 150, 250),
                   help="feature timesteps of 1000 (default 50,150,250)")
    p.add_argument("--class-label", type=int, help="class-conditional checkpoints: the ImageNet class to fix (0-999)")
    return p


def run_convert_backbone(args: argparse.Namespace) -> int:
    flags = ADM_PRESETS[args.arch] if args.arch else args.adm_flags
    summary = convert_adm_checkpoint(args.checkpoint, flags, args.out, taps=args.taps, timesteps=args.timesteps,
                                     class_label=args.class_label)
    print(json.dumps(summary, indent=2))
    return 0

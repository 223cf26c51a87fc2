"""Where guided-diffusion (ADM) ``output_blocks`` live in a diffusers ``UNet2DModel``: the paper's taps.

The backbone reads features at these points (the reference code taps ADM's output_blocks 4, 6, 8, 12);
the checkpoint conversion (``fasttextdiff.conversion.adm``) lays out the same network, so both share
this one numbering, and the backbone needs nothing of the conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["AdmTap", "output_block_taps", "nearest_up_blocks"]

@dataclass(frozen=True)
class AdmTap:
    """Where ADM's ``output_blocks[output_block]`` output lives in the converted UNet2DModel.

    ``module`` is the diffusers submodule (``unet.get_submodule(module)``) whose forward output equals
    it: the level's upsampler for a level's last block (but the finest level's), else the block's
    attention if it has one, else its resnet. ``ends_up_block`` marks the taps that are a whole
    up-block's output (what BackboneConfig.feature_blocks taps; feature_taps taps any of them).
    """

    output_block: int
    module: str
    up_block: int
    channels: int
    size: int
    ends_up_block: bool


def output_block_taps(config: Any) -> list[AdmTap]:
    """All of ADM's output_blocks as taps, read off a UNet2DModel config (a dict or ``unet.config``)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    types, per = list(get("up_block_types")), int(get("layers_per_block")) + 1
    widths = list(reversed(list(get("block_out_channels"))))
    size = get("sample_size")
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    size //= 2 ** (len(types) - 1)
    taps = []
    for i, kind in enumerate(types):
        last_block = i == len(types) - 1
        for j in range(per):
            ends = j == per - 1
            if ends and not last_block:
                module, tap_size = f"up_blocks.{i}.upsamplers.0", size * 2
            else:
                module, tap_size = f"up_blocks.{i}.{'attentions' if 'Attn' in kind else 'resnets'}.{j}", size
            taps.append(AdmTap(i * per + j, module, i, widths[i], tap_size, ends))
        if not last_block:
            size *= 2
    return taps


def nearest_up_blocks(taps: Sequence[AdmTap]) -> tuple[int, ...]:
    """Whole up-blocks at the resolutions of ``taps``, for a backbone config that taps up-blocks only.

    A tap inside up-block i (before its upsampler) has the resolution of up-block i-1's output;
    up-block 0 stands in for taps inside itself (nothing coarser is an up-block output).
    """
    return tuple(sorted({t.up_block if t.ends_up_block else max(t.up_block - 1, 0) for t in taps}))

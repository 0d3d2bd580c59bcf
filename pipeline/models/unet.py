"""A compact U-Net velocity field in the style of ADM (guided-diffusion) / EDM2.

Layout, for ``channel_mult = [1, 2, 2]`` at resolution 16:

    in conv -> [level 0 @16: res blocks] -> down -> [level 1 @8] -> down -> [level 2 @4]
            -> middle (res, [attn], res)
            -> [level 2 @4] -> up -> [level 1 @8] -> up -> [level 0 @16] -> norm/SiLU/out conv

Every res block is conditioned on a (time + class) embedding through a per-channel
scale/shift after its second GroupNorm. Self-attention follows the res blocks at every
level (and the middle) whose feature-map size is listed in ``attention_resolutions``.
The decoder concatenates the matching encoder activation (skip connection) into each of its
res blocks. Residual branches and the output conv start at zero, so the fresh network
predicts v = 0 and every block starts as the identity (stable early training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.embeddings import TimeEmbedding, check_labels, expand_time


def _zero(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with scale-shift embedding injection and a residual path.

    forward(x (B, in_ch, H, W), emb (B, emb_dim)) -> (B, out_ch, H, W)
    """

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, norm_groups: int
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # One linear produces both scale and shift (2 * out_ch) from the embedding.
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(norm_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        # (1 + scale) so a zero projection leaves the normalised features unchanged.
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual path.

    forward(x (B, C, H, W)) -> (B, C, H, W)
    """

    def __init__(self, channels: int, num_heads: int, norm_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        # -> 3 x (B, heads, H*W, C/heads), copied so the head dimension is innermost: the
        # fused (flash / memory-efficient) attention kernels need it, else SDPA falls back
        # to the unfused math path that materialises the (H*W)^2 attention matrix.
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Strided 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """A res block optionally followed by attention: one unit of the encoder/decoder."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """Conditional U-Net velocity field v_theta(x_t, t[, label]).

    forward(x_t (B, C, H, W), t (B,) or scalar in [0, 1], label (B,) int | None)
        -> (B, C, H, W)

    ``label`` values lie in [0, num_classes]; ``num_classes`` is the null class used for
    classifier-free guidance, and ``label=None`` means the null class for every sample.
    With ``num_classes == 0`` the model is unconditional and has no class embedding.
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (8,),
        num_heads: int = 4,
        dropout: float = 0.0,
        norm_groups: int = 8,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        channel_mult = list(channel_mult)
        attention_resolutions = list(attention_resolutions)
        _validate(
            in_channels,
            resolution,
            base_channels,
            channel_mult,
            num_res_blocks,
            attention_resolutions,
            num_heads,
            dropout,
            norm_groups,
            num_classes,
        )
        self.in_channels = in_channels
        self.resolution = resolution
        self.num_classes = num_classes
        attn_sizes = set(attention_resolutions)

        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(freq_dim=base_channels, emb_dim=emb_dim)
        # No class embedding at all when unconditional: DDP must see no unused parameters.
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        def stage(cin: int, cout: int, size: int) -> _Stage:
            res = ResBlock(cin, cout, emb_dim, dropout, norm_groups)
            attn = AttentionBlock(cout, num_heads, norm_groups) if size in attn_sizes else None
            return _Stage(res, attn)

        ch = base_channels * channel_mult[0]
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Encoder. skip_chs records the channels of every activation the decoder will reuse.
        size = resolution
        skip_chs = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = base_channels * mult
                self.down.append(stage(ch, out, size))
                ch = out
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                size //= 2
                skip_chs.append(ch)

        self.mid = nn.ModuleList(
            [stage(ch, ch, size), ResBlock(ch, ch, emb_dim, dropout, norm_groups)]
        )

        # Decoder: num_res_blocks + 1 blocks per level, each consuming one skip activation.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out = base_channels * mult
                self.up.append(stage(ch + skip_chs.pop(), out, size))
                ch = out
                if level != 0 and i == num_res_blocks:
                    self.up.append(Upsample(ch))
                    size *= 2
        assert not skip_chs and size == resolution

        self.out_norm = nn.GroupNorm(norm_groups, ch)
        self.out_conv = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(self, x_t: Tensor, t: Tensor | float, label: Tensor | None = None) -> Tensor:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != expected:
            raise ValueError(
                f"x_t must have shape (B, {', '.join(map(str, expected))}), got {tuple(x_t.shape)}"
            )
        batch = x_t.shape[0]
        emb = self.time_embed(expand_time(t, batch, x_t.device))
        if self.class_embed is not None:
            emb = emb + self.class_embed(check_labels(label, self.num_classes, batch, x_t.device))
        elif label is not None:
            raise ValueError("label was given but the model is unconditional (num_classes=0)")

        h = self.input_conv(x_t)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, _Stage) else block(h)
            skips.append(h)
        h = self.mid[1](self.mid[0](h, emb), emb)
        for block in self.up:
            if isinstance(block, _Stage):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = block(h)
        out = self.out_conv(F.silu(self.out_norm(h)))
        # Autocast may leave the conv output in bf16; return the input's dtype.
        return out.to(x_t.dtype)


def _validate(
    in_channels: int,
    resolution: int,
    base_channels: int,
    channel_mult: list[int],
    num_res_blocks: int,
    attention_resolutions: list[int],
    num_heads: int,
    dropout: float,
    norm_groups: int,
    num_classes: int,
) -> None:
    """Raise ValueError naming the first invalid constructor argument."""
    for name, value in (
        ("in_channels", in_channels),
        ("resolution", resolution),
        ("base_channels", base_channels),
        ("num_res_blocks", num_res_blocks),
        ("num_heads", num_heads),
        ("norm_groups", norm_groups),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not channel_mult or any(not isinstance(m, int) or m < 1 for m in channel_mult):
        raise ValueError(
            f"channel_mult must be a non-empty list of positive integers, got {channel_mult!r}"
        )
    factor = 2 ** (len(channel_mult) - 1)
    if resolution % factor:
        raise ValueError(
            f"resolution {resolution} must be divisible by 2**(len(channel_mult)-1) = {factor} "
            f"(channel_mult={channel_mult} has {len(channel_mult)} levels)"
        )
    for mult in channel_mult:
        if (base_channels * mult) % norm_groups:
            raise ValueError(
                f"base_channels * channel_mult = {base_channels} * {mult} = "
                f"{base_channels * mult} must be divisible by norm_groups={norm_groups}"
            )
    sizes = [resolution // 2**level for level in range(len(channel_mult))]
    for size in attention_resolutions:
        if size not in sizes:
            raise ValueError(
                f"attention_resolutions contains {size!r}, which is not a feature-map size of "
                f"this U-Net; sizes are {sizes} (resolution {resolution}, "
                f"{len(channel_mult)} levels)"
            )
        ch = base_channels * channel_mult[sizes.index(size)]
        if ch % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the {ch} channels at attention "
                f"resolution {size}"
            )

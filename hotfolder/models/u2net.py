"""U²-Net and U²-Net-P (Qin et al., "U²-Net: Going Deeper with Nested U-Structure for Salient
Object Detection", Pattern Recognition 2020), in inference form.

Batch-norm is folded into each convolution's bias, exactly as in the ONNX files that rembg ships,
so a block is just conv + ReLU. Modules are registered in the order the forward pass runs them:
the ONNX importer relies on that order to pair each ONNX ``Conv`` node with its module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def upsample_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


def pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


class ConvReLU(nn.Module):
    """3×3 convolution (batch-norm folded in) and ReLU: U²-Net's ``REBNCONV``."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class RSU(nn.Module):
    """Residual U-block of the given height (``RSU7`` … ``RSU4``): a small U-Net whose output is
    added to its input projection. Each encoder level below the first halves the resolution."""

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv_in = ConvReLU(in_ch, out_ch)
        self.encoder = nn.ModuleList(
            [ConvReLU(out_ch, mid_ch)] + [ConvReLU(mid_ch, mid_ch) for _ in range(height - 2)]
        )
        self.bottom = ConvReLU(mid_ch, mid_ch, dilation=2)
        self.decoder = nn.ModuleList(
            [ConvReLU(2 * mid_ch, mid_ch) for _ in range(height - 2)]
            + [ConvReLU(2 * mid_ch, out_ch)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in: torch.Tensor = self.conv_in(x)
        skips = []
        h: torch.Tensor = x_in
        for level, conv in enumerate(self.encoder):
            if level > 0:
                h = pool(h)
            h = conv(h)
            skips.append(h)
        h = self.bottom(h)
        for level, (conv, skip) in enumerate(zip(self.decoder, reversed(skips), strict=True)):
            if level > 0:
                h = upsample_like(h, skip)
            h = conv(torch.cat((h, skip), 1))
        return h + x_in


class DilatedRSU(nn.Module):
    """``RSU4F``: the residual U-block for the lowest resolutions, where pooling is replaced by
    growing dilation (1, 2, 4, 8) so the feature map keeps its size."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv_in = ConvReLU(in_ch, out_ch)
        self.encoder = nn.ModuleList(
            [ConvReLU(out_ch, mid_ch, 1), ConvReLU(mid_ch, mid_ch, 2), ConvReLU(mid_ch, mid_ch, 4)]
        )
        self.bottom = ConvReLU(mid_ch, mid_ch, dilation=8)
        self.decoder = nn.ModuleList(
            [
                ConvReLU(2 * mid_ch, mid_ch, 4),
                ConvReLU(2 * mid_ch, mid_ch, 2),
                ConvReLU(2 * mid_ch, out_ch, 1),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in: torch.Tensor = self.conv_in(x)
        skips = []
        h: torch.Tensor = x_in
        for conv in self.encoder:
            h = conv(h)
            skips.append(h)
        h = self.bottom(h)
        for conv, skip in zip(self.decoder, reversed(skips), strict=True):
            h = conv(torch.cat((h, skip), 1))
        return h + x_in


@dataclass(frozen=True)
class U2NetWidths:
    """Channel widths of one U²-Net variant: (in, mid, out) per encoder stage 1–6 and decoder
    stage 5d–1d, and the input channels of the six side-output convolutions."""

    encoder: tuple[tuple[int, int, int], ...]
    decoder: tuple[tuple[int, int, int], ...]
    side: tuple[int, ...]


U2NETP_WIDTHS = U2NetWidths(
    encoder=((3, 16, 64), (64, 16, 64), (64, 16, 64), (64, 16, 64), (64, 16, 64), (64, 16, 64)),
    decoder=((128, 16, 64), (128, 16, 64), (128, 16, 64), (128, 16, 64), (128, 16, 64)),
    side=(64, 64, 64, 64, 64, 64),
)

U2NET_WIDTHS = U2NetWidths(
    encoder=(
        (3, 32, 64),
        (64, 32, 128),
        (128, 64, 256),
        (256, 128, 512),
        (512, 256, 512),
        (512, 256, 512),
    ),
    decoder=((1024, 256, 512), (1024, 128, 256), (512, 64, 128), (256, 32, 64), (128, 16, 64)),
    side=(64, 64, 128, 256, 512, 512),
)

# Heights of the residual U-blocks from the top stage down; 0 marks the dilated RSU4F.
ENCODER_HEIGHTS = (7, 6, 5, 4, 0, 0)
DECODER_HEIGHTS = (0, 4, 5, 6, 7)  # stage 5d … 1d


def make_block(height: int, in_ch: int, mid_ch: int, out_ch: int) -> nn.Module:
    if height == 0:
        return DilatedRSU(in_ch, mid_ch, out_ch)
    return RSU(height, in_ch, mid_ch, out_ch)


class U2Net(nn.Module):
    """The full network. ``forward`` returns only the fused saliency map (sigmoid of ``outconv``),
    shape ``(N, 1, H, W)``: the six side outputs matter for training, not for matting."""

    def __init__(self, widths: U2NetWidths) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(
            make_block(h, *w) for h, w in zip(ENCODER_HEIGHTS, widths.encoder, strict=True)
        )
        self.decoder = nn.ModuleList(
            make_block(h, *w) for h, w in zip(DECODER_HEIGHTS, widths.decoder, strict=True)
        )
        self.side = nn.ModuleList(nn.Conv2d(ch, 1, 3, padding=1) for ch in widths.side)
        self.outconv = nn.Conv2d(len(widths.side), 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for stage, block in enumerate(self.encoder):
            if stage > 0:
                h = pool(h)
            h = block(h)
            skips.append(h)
        # Decoder stage k takes the stage below it (upsampled) and the encoder output of its level.
        decoded = [h]
        for block, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            h = block(torch.cat((upsample_like(h, skip), skip), 1))
            decoded.append(h)
        # decoded runs from stage 6 up to stage 1d; side outputs go from 1 (finest) to 6.
        finest = decoded[-1]
        sides = [
            upsample_like(side(feature), finest) if level > 0 else side(feature)
            for level, (side, feature) in enumerate(zip(self.side, reversed(decoded), strict=True))
        ]
        fused: torch.Tensor = self.outconv(torch.cat(sides, 1))
        return torch.sigmoid(fused)

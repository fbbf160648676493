"""A CPU fast path for convolutions whose output is a single pixel.

The last stage of a ResNet on small images (``test_resnet`` on 16-px digits: 2×2 → 1×1 and 1×1 →
1×1 maps; any ResNet whose last map is 1×1) runs convolutions whose output is one pixel. Such a
convolution is exactly one matrix product: the output pixel's window overlaps the input in a
corner block of at most ``kernel − padding`` rows and columns, and everything else it covers is
zero padding. oneDNN's backward pass for these shapes runs at about a tenth of the matmul rate
(192→96, 3×3, stride 2 on 2×2 maps, batch 256, one thread: 14.6 ms forward and backward, against
2.3 ms as a product), so ``SinglePixelConv2d`` computes them as ``F.linear`` on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SinglePixelConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes a single-pixel output as one matrix product on the CPU.

    For an input of H × W and an output of 1 × 1, the window starts at (−p_h, −p_w), so it reads
    the input block x[:, :, :h, :w] with h = min(H, k_h − p_h), w = min(W, k_w − p_w), through the
    kernel taps weight[:, :, p_h:p_h + h, p_w:p_w + w]:

        y[b, o] = bias[o] + Σ_{c, i < h, j < w} weight[o, c, p_h + i, p_w + j] · x[b, c, i, j]

    Parameters, buffers and state-dict keys are ``nn.Conv2d``'s. Every other case (another device,
    groups, dilation, a padding mode or string padding, an output larger than one pixel) takes
    ``nn.Conv2d``'s own path.
    """

    def _single_pixel_taps(self, x: torch.Tensor) -> tuple[int, int] | None:
        """(h, w) of the input block the output pixel reads, or None where the fast path is off."""
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or self.groups != 1
            or self.dilation != (1, 1)
            or self.padding_mode != "zeros"
            or not isinstance(self.padding, tuple)
        ):
            return None
        height, width = x.shape[-2:]
        blocks = []
        for size, kernel, stride, pad in zip(
            (height, width), self.kernel_size, self.stride, self.padding, strict=True
        ):
            if size + 2 * pad < kernel or (size + 2 * pad - kernel) // stride != 0 or pad >= kernel:
                return None
            blocks.append(min(size, kernel - pad))
        return blocks[0], blocks[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self._single_pixel_taps(x)
        if block is None:
            return super().forward(x)
        h, w = block
        ph, pw = self.padding
        batch, channels = x.shape[:2]
        region = x[:, :, :h, :w]
        taps = self.weight[:, :, ph:ph + h, pw:pw + w]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # (c, i, j) flattened channel-fastest, the order a channels-last input is stored in
            flat_x = region.permute(0, 2, 3, 1).reshape(batch, channels * h * w)
            flat_w = taps.permute(0, 2, 3, 1).reshape(self.out_channels, channels * h * w)
        else:
            flat_x = region.reshape(batch, channels * h * w)
            flat_w = taps.reshape(self.out_channels, channels * h * w)
        return F.linear(flat_x, flat_w, self.bias).view(batch, self.out_channels, 1, 1)


def use_single_pixel_convolutions(model: nn.Module) -> nn.Module:
    """Give every plain ``nn.Conv2d`` of ``model`` the single-pixel fast path, in place.

    The modules change class rather than being rebuilt: a rebuilt module would draw new initial
    weights from the global RNG and shift every later draw. Subclasses of ``nn.Conv2d`` (timm's
    same-padding or weight-standardised convolutions) are left as they are.
    """
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = SinglePixelConv2d
    return model

"""Batched image ops on the training device: one call transforms a whole (B, C, H, W) batch with
per-sample parameters, with no per-sample Python loop.

Each op reproduces the semantics of the torchvision tensor kernel it names (parameter
distributions, op order, ranges and clamping); ``datasets.views`` chains them into random views.
Random draws use the ``generator`` passed in (which must live on the images' device) or the
default generator of that device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "eval_view",
    "gaussian_blur",
    "hflip",
    "normalize",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "random_erase",
    "solarize",
]

# torchvision's luma weights (``rgb_to_grayscale``), which follow TensorFlow's.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def _rng_device(
    generator: torch.Generator | None, device: torch.device | str | None
) -> torch.device:
    if device is not None:
        device = torch.device(device)
        if generator is not None and torch.device(generator.device).type != device.type:
            raise ValueError(
                f"the generator is on {generator.device} but the images are on {device}; "
                "create it with torch.Generator(device=images.device)"
            )
        return device
    return torch.device(generator.device) if generator is not None else torch.device("cpu")


def _rand(n: int, device: torch.device, generator: torch.Generator | None, *shape: int) -> Tensor:
    return torch.rand((n, *shape), device=device, generator=generator)


def sample_crop_boxes(
    height: int,
    width: int,
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``n`` crop boxes with ``RandomResizedCrop.get_params`` semantics.

    Each sample gets 10 tries at once: area fraction ~ U(scale), log aspect ratio ~ U(log ratio),
    ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``; the first try with
    ``0 < w <= width`` and ``0 < h <= height`` wins and its top-left corner is uniform over the
    valid positions. A sample with no accepted try gets torchvision's central-crop fallback.

    Returns an int64 tensor (n, 4) of rows (top, left, h, w) on ``device`` (default: the
    generator's device, else CPU).
    """
    device = _rng_device(generator, device)
    # torchvision draws in float32 and does the box arithmetic in Python floats; float64 here
    # keeps round-half-to-even ties landing where torchvision's would. MPS has no float64.
    wide = torch.float32 if device.type == "mps" else torch.float64
    log_lo, log_hi = torch.log(torch.tensor(ratio, dtype=torch.float32)).tolist()
    frac = scale[0] + (scale[1] - scale[0]) * _rand(n, device, generator, 10)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand(n, device, generator, 10))
    target = (height * width) * frac.to(wide)
    aspect = aspect.to(wide)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first True; 0 when none
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # Uniform integer in [0, extent] per sample; torch.randint has no per-element bound.
    top = torch.floor(_rand(n, device, generator).to(wide) * (height - h + 1))
    left = torch.floor(_rand(n, device, generator).to(wide) * (width - w + 1))
    top = torch.minimum(top, height - h)
    left = torch.minimum(left, width - w)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    fallback = torch.tensor(
        [(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.int64, device=device
    )
    boxes = torch.stack((top, left, h, w), dim=1).to(torch.int64)
    return torch.where(ok.any(dim=1, keepdim=True), boxes, fallback)


def resized_crop(
    images: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None
) -> Tensor:
    """Crop each image to its box (top, left, h, w) and resize it to (size, size), bilinearly.

    One ``grid_sample`` call serves the whole batch. The sampling points are those of
    torchvision's ``resized_crop(img, top, left, h, w, [size, size], antialias=False)``: output
    pixel ``o`` reads crop coordinate ``(o + 0.5) * h / size - 0.5`` (half-pixel centres), clamped
    to the crop, so no pixel outside the box leaks in at its edges.

    When a crop side is larger than the output (downsampling), torchvision's default
    ``antialias=True`` low-pass filters along that side first and therefore differs from this
    (it equals ``antialias=False``). The two agree when the crop is no larger than the output
    (upsampling or equal size). That covers every full-size view of the in-memory datasets, which
    crop to their own resolution; multi-crop local views can be downsampled (digits' 8 px local
    crops come from boxes up to 13 px; STL-10's 40 px ones from up to 41 px).

    ``flip`` (B,) mirrors the samples where it is True left-right, bit for bit as ``hflip`` of the
    output would, by reading their columns in reverse order.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
        )
    n, c, height, width = images.shape
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes must have shape ({n}, 4), got {tuple(boxes.shape)}")
    top, left, h, w = boxes.to(device=images.device, dtype=images.dtype).unbind(dim=1)
    # The crop has no rotation, so the sampling grid is one row of x and one column of y per
    # sample; building them per axis avoids a full (B, size, size) affine grid and its clamps.
    centres = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size

    def axis(start: Tensor, extent: Tensor, full: int) -> Tensor:
        # In pixel-edge units (pixel i spans [i, i + 1]), clamped to the centres of the box's
        # first and last pixels as torchvision's interpolate clamps to the cropped tensor; then
        # grid_sample's normalised units for align_corners=False.
        at = start.unsqueeze(1) + centres * extent.unsqueeze(1)
        at = torch.minimum(torch.maximum(at, (start + 0.5).unsqueeze(1)),
                           (start + extent - 0.5).unsqueeze(1))
        return at * (2.0 / full) - 1.0

    xs, ys = axis(left, w, width), axis(top, h, height)  # (B, size) each
    if flip is not None:
        xs = torch.where(flip.view(-1, 1), xs.flip(-1), xs)
    grid = torch.stack(
        (xs.unsqueeze(1).expand(n, size, size), ys.unsqueeze(2).expand(n, size, size)), dim=-1
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def hflip(images: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mirror left-right the images where ``mask`` (B,) is True (all images when None)."""
    if mask is None:
        return images.flip(-1)
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


# --------------------------------------------------------------------------------------------
# Photometric ops (float images in [0, 1], per-sample factors of shape (B,))
# --------------------------------------------------------------------------------------------


def _per_sample(factor: Tensor | float, images: Tensor) -> Tensor:
    factor = torch.as_tensor(factor, dtype=images.dtype, device=images.device)
    return factor.reshape(-1, 1, 1, 1) if factor.ndim else factor


def _blend(images: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    # torchvision's _blend: ratio * img1 + (1 - ratio) * img2, clamped to the valid range.
    return (images * ratio + other * (1.0 - ratio)).clamp_(0.0, 1.0)


def _gray(images: Tensor) -> Tensor:
    r, g, b = images.unbind(dim=-3)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Luma with torchvision's weights, repeated over the 3 channels; 1-channel input unchanged."""
    if images.shape[-3] == 1:
        return images
    return _gray(images).expand_as(images)


def adjust_brightness(images: Tensor, factor: Tensor | float) -> Tensor:
    """``F.adjust_brightness`` with a per-sample factor: ``clamp(factor * x, 0, 1)``."""
    return _blend(
        images,
        torch.zeros((), dtype=images.dtype, device=images.device),
        _per_sample(factor, images),
    )


def adjust_contrast(images: Tensor, factor: Tensor | float) -> Tensor:
    """``F.adjust_contrast`` per sample: blend with the mean of each image's grayscale."""
    ref = _gray(images) if images.shape[-3] == 3 else images
    mean = ref.mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, _per_sample(factor, images))


def adjust_saturation(images: Tensor, factor: Tensor | float) -> Tensor:
    """``F.adjust_saturation`` per sample: blend with the grayscale; identity on 1 channel."""
    if images.shape[-3] == 1:
        return images
    return _blend(images, _gray(images), _per_sample(factor, images))


def adjust_hue(images: Tensor, factor: Tensor | float) -> Tensor:
    """``F.adjust_hue`` per sample: rotate the HSV hue by ``factor`` turns; identity on 1 channel.

    torchvision converts to HSV, shifts h and converts back. Saturation and value do not change,
    so the round trip reduces to, with ``M = max(r, g, b)``, ``C = M - min(r, g, b)`` and the
    shifted hue ``H`` in sextants [0, 6):

        out_n = M - C · clamp(min(k_n, 4 - k_n), 0, 1),   k_n = (H + n) mod 6,   n = 5, 3, 1 for r, g, b

    (the closed form of HSV -> RGB). It equals torchvision's result up to float rounding, in
    about half the time (fewer element-wise passes, no gather).
    """
    if images.shape[-3] == 1:
        return images
    r, g, b = images.unbind(dim=-3)
    maxc = images.amax(dim=-3)
    chroma = maxc - images.amin(dim=-3)
    # Grey pixels have no hue; any value works there because chroma is 0.
    inv_chroma = torch.where(chroma > 0, chroma, 1.0).reciprocal_()
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    # Hue in sextants, in (-1, 5]: Pillow's rule for which channel is the maximum.
    sextant = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g)).mul_(inv_chroma)
    sextant += torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    shift = _per_sample(factor, images)
    shift = shift.squeeze(-1) if shift.ndim else shift  # (B, 1, 1) against (B, H, W)
    sextant = sextant.add_(6.0 * shift).unsqueeze(-3)
    k = (sextant + _HUE_OFFSETS.to(images)).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(-3) - chroma.unsqueeze(-3) * ramp


# k_n's offsets for r, g and b in adjust_hue's closed form.
_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def _apply_masked(
    images: Tensor,
    mask: Tensor,
    fn: Callable[..., Tensor],
    *args: Tensor,
    dense: bool | None = None,
    inplace: bool = False,
) -> Tensor:
    """``fn(images, *args)`` on the samples where ``mask`` is True, the rest unchanged.

    On CPU only the selected samples are computed. Elsewhere (``dense``) the op runs on the whole
    batch and is selected with ``where``: selecting a subset needs the mask's count on the host,
    which would stall an asynchronous device at every call. ``inplace`` says the caller owns
    ``images``: the CPU path then writes the selected samples back into it instead of a copy.
    """
    if dense is None:
        dense = images.device.type != "cpu"
    if not dense:
        idx = mask.nonzero().squeeze(1)
        if idx.numel() == 0:
            return images
        if idx.numel() == len(images):
            return fn(images, *args)
        out = images if inplace else images.clone()
        out[idx] = fn(images[idx], *(a[idx] for a in args))
        return out
    return torch.where(mask.view(-1, 1, 1, 1), fn(images, *args), images)


def color_jitter(
    images: Tensor,
    brightness: Tensor | None,
    contrast: Tensor | None,
    saturation: Tensor | None,
    hue: Tensor | None,
    order: Tensor,
    apply: Tensor | None = None,
) -> Tensor:
    """``ColorJitter`` with per-sample factors (B,) and per-sample op order ``order`` (B, 4).

    ``order[b]`` is a permutation of (0, 1, 2, 3) = (brightness, contrast, saturation, hue), as
    ``torch.randperm(4)`` in ``ColorJitter.get_params``; a factor of None skips that op (a
    strength of 0 in ``ColorJitter``). Samples where ``apply`` is False are left unchanged
    (``RandomApply``).
    """
    if apply is None:
        apply = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
    rgb = images.shape[-3] == 3
    ops = [
        (code, fn, factor)
        for code, fn, factor in (
            (0, adjust_brightness, brightness),
            (1, adjust_contrast, contrast),
            (2, adjust_saturation, saturation if rgb else None),
            (3, adjust_hue, hue if rgb else None),
        )
        if factor is not None
    ]
    # One copy up front; the masked ops then overwrite their samples of it in place.
    out = images.clone()
    for step in range(4):
        # At each position of the order, every op runs on the samples that have it there.
        op = torch.where(apply, order[:, step], -1)
        for code, fn, factor in ops:
            out = _apply_masked(out, op == code, fn, factor, inplace=True)
    return out


def _gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    # torchvision's _get_gaussian_kernel1d, one row per sigma.
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, dtype=sigma.dtype, device=sigma.device)
    pdf = torch.exp(-0.5 * (x / sigma.unsqueeze(1)).pow(2))
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(images: Tensor, sigma: Tensor | float, kernel_size: int) -> Tensor:
    """``F.gaussian_blur(img, [k, k], [s, s])`` with a per-sample sigma (B,).

    Separable (rows then columns, equal to torchvision's outer-product kernel up to rounding),
    reflect padding, and one grouped ``conv2d`` per direction so each sample uses its own kernel.
    """
    n, c, height, width = images.shape
    sigma = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).expand(n)
    kernel = _gaussian_kernels(sigma, kernel_size).repeat_interleave(c, dim=0)  # (n*c, k)
    pad = kernel_size // 2
    x = F.pad(images.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return x.view(n, c, height, width)


def solarize(images: Tensor, threshold: float, mask: Tensor | None = None) -> Tensor:
    """``F.solarize``: pixels ``>= threshold`` become ``1 - x``, on samples where ``mask`` is True."""
    hit = images >= threshold
    if mask is not None:
        hit = hit & mask.view(-1, 1, 1, 1)
    return torch.where(hit, 1.0 - images, images)


# Tries per image before RandomErasing gives up and leaves the image whole (torchvision's 10).
ERASE_TRIES = 10


def random_erase(
    images: Tensor,
    mask: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """``RandomErasing(p, scale, ratio, value=0)`` on the images where ``mask`` is True.

    Per image, as torchvision draws it: up to 10 tries of an area ``H·W·U(scale)`` and an aspect
    ratio ``exp(U(log ratio))``, rounded to a box ``h = round(√(area·r))``, ``w = round(√(area/r))``;
    the first box with ``h < H`` and ``w < W`` is placed uniformly and set to 0; an image whose
    ten tries all fail is left whole. Applied after normalisation, 0 is the channel mean.
    """
    n, _, height, width = images.shape
    device = images.device
    fraction = scale[0] + (scale[1] - scale[0]) * _rand(n, device, generator, ERASE_TRIES)
    area = height * width * fraction
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand(n, device, generator, ERASE_TRIES))
    box_h = torch.round(torch.sqrt(area * aspect)).long()
    box_w = torch.round(torch.sqrt(area / aspect)).long()
    fits = (box_h < height) & (box_w < width)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits
    box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
    top = (_rand(n, device, generator) * (height - box_h + 1)).long()
    left = (_rand(n, device, generator) * (width - box_w + 1)).long()
    rows = torch.arange(height, device=device).view(1, -1)
    cols = torch.arange(width, device=device).view(1, -1)
    inside_rows = (rows >= top.view(-1, 1)) & (rows < (top + box_h).view(-1, 1))
    inside_cols = (cols >= left.view(-1, 1)) & (cols < (left + box_w).view(-1, 1))
    erase = inside_rows.unsqueeze(2) & inside_cols.unsqueeze(1)  # (N, H, W)
    erase &= (mask & fits.any(dim=1)).view(-1, 1, 1)
    return images.masked_fill(erase.unsqueeze(1), 0.0)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def _to_float(images: Tensor) -> Tensor:
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float, got {images.dtype}")
    return images.to(torch.float32)


def _stats(values: Sequence[float] | Tensor, like: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device).flatten()
    if t.numel() != like.shape[-3]:
        raise ValueError(
            f"{name} has {t.numel()} values but the images have {like.shape[-3]} channels"
        )
    return t.view(-1, 1, 1)


def normalize(
    images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> Tensor:
    """Per-channel ``(x - mean) / std``; uint8 input is first scaled to [0, 1]."""
    images = _to_float(images)
    return (images - _stats(mean, images, "mean")) / _stats(std, images, "std")


def eval_view(
    images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> Tensor:
    """The deterministic eval transform of in-memory data: to float in [0, 1], then normalise."""
    return normalize(images, mean, std)

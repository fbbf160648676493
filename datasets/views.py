"""Batched, on-device multi-view augmentation.

The whole batch lives on the training device as one (B, C, H, W) tensor and every sample draws
its own random parameters; there is no per-sample Python loop. The ops (``datasets.ops``)
reproduce the semantics of torchvision's tensor kernels (parameter distributions, op order, ranges
and clamping), so a view produced here is distributed like the one the usual per-sample pipeline
``RandomResizedCrop -> RandomHorizontalFlip -> RandomApply(ColorJitter) -> RandomGrayscale ->
RandomApply(GaussianBlur) -> RandomSolarize -> Normalize`` would produce on a float tensor.

Random draws use the ``generator`` passed in (which must live on the images' device) or the
default generator of that device. The draws do not reproduce torchvision's random stream, only its
distributions: torchvision draws one sample at a time, here every parameter is drawn for the whole
batch at once.

The per-dataset view recipes (``view_config``) follow docs/recipes.md §3 and, for the MNIST
family, docs/datasets.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

# The ops are re-exported: ``datasets.views`` is the augmentation API the engine and tests import.
from datasets.ops import (
    _apply_masked,
    _rng_device,
    _to_float,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    eval_view,
    gaussian_blur,
    hflip,
    normalize,
    random_erase,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_boxes,
    solarize,
)

__all__ = [
    "DATASETS",
    "VIEW_KINDS",
    "RECIPES",
    "MultiViewAugment",
    "Recipe",
    "ViewConfig",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "eval_view",
    "gaussian_blur",
    "hflip",
    "normalize",
    "random_erase",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "solarize",
    "view_config",
]

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewConfig:
    """The random transform that produces one view.

    Pipeline order: crop -> flip -> colour jitter (applied as a whole with ``jitter_p``) ->
    grayscale -> blur -> solarise -> normalise -> random erasing (``erase_p``, CLD's CIFAR-10
    pipeline). A jitter strength of 0 disables that component; a probability of 0 disables that
    op.
    """

    size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_kernel: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    erase_p: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self) -> None:
        # Configs often arrive from YAML (lists, ints); coerce so the frozen value is hashable
        # and compares equal to one built in code.
        for name in ("crop_scale", "crop_ratio", "blur_sigma", "erase_scale", "erase_ratio"):
            value = getattr(self, name)
            if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
                raise ValueError(f"ViewConfig.{name}={value!r} is invalid: need a pair (lo, hi)")
            try:
                pair = (float(value[0]), float(value[1]))
            except (TypeError, ValueError):
                raise ValueError(
                    f"ViewConfig.{name}={value!r} is invalid: need a pair of numbers (lo, hi)"
                ) from None
            object.__setattr__(self, name, pair)
        for f in fields(self):
            if f.type in ("float", float):
                value = getattr(self, f.name)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"ViewConfig.{f.name}={value!r} is invalid: need a number")
                object.__setattr__(self, f.name, float(value))

        for name in ("size", "blur_kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ViewConfig.{name}={value!r} is invalid: need an integer")

        def check(name: str, ok: bool, valid: str) -> None:
            if not ok:
                raise ValueError(
                    f"ViewConfig.{name}={getattr(self, name)!r} is invalid: valid range is {valid}"
                )

        check("size", self.size >= 1, "an integer >= 1")
        lo, hi = self.crop_scale
        check("crop_scale", 0.0 < lo <= hi <= 1.0, "0 < lo <= hi <= 1")
        lo, hi = self.crop_ratio
        check("crop_ratio", 0.0 < lo <= hi < math.inf, "0 < lo <= hi < inf")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "erase_p"):
            check(name, 0.0 <= getattr(self, name) <= 1.0, "[0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            check(name, 0.0 <= getattr(self, name) < math.inf, "[0, inf)")
        # A hue shift beyond half a turn is the same as a smaller shift the other way.
        check("hue", 0.0 <= self.hue <= 0.5, "[0, 0.5]")
        check(
            "blur_kernel",
            self.blur_kernel >= 1 and self.blur_kernel % 2 == 1,
            "an odd integer >= 1",
        )
        lo, hi = self.blur_sigma
        check("blur_sigma", 0.0 < lo <= hi < math.inf, "0 < lo <= hi < inf")
        if self.blur_p > 0:
            # Reflect padding needs a pad smaller than the image it pads.
            check(
                "blur_kernel",
                self.blur_kernel // 2 < self.size,
                f"an odd integer with blur_kernel // 2 < size ({self.size}) when blur_p > 0",
            )
        check("solarize_threshold", 0.0 <= self.solarize_threshold <= 1.0, "[0, 1]")
        lo, hi = self.erase_scale
        check("erase_scale", 0.0 < lo <= hi <= 1.0, "0 < lo <= hi <= 1")
        lo, hi = self.erase_ratio
        check("erase_ratio", 0.0 < lo <= hi < math.inf, "0 < lo <= hi < inf")


# --------------------------------------------------------------------------------------------
# The full pipeline
# --------------------------------------------------------------------------------------------


def _uniform(n: int, lo: float, hi: float, like: Tensor, g: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, device=like.device, generator=g, dtype=like.dtype)


def _bernoulli(n: int, p: float, like: Tensor, g: torch.Generator | None) -> Tensor:
    return torch.rand(n, device=like.device, generator=g) < p


def _augment_view(images: Tensor, cfg: ViewConfig, g: torch.Generator | None) -> Tensor:
    """One random view of float images in [0, 1], before normalisation."""
    n, c, height, width = images.shape
    # The whole square image at its own size (the file-backed path crops before the device): the
    # view is the image itself, where drawing a box and resampling would only add rounding.
    whole = cfg.crop_scale == cfg.crop_ratio == (1.0, 1.0) and height == width == cfg.size
    boxes = None if whole else sample_crop_boxes(
        height, width, n, cfg.crop_scale, cfg.crop_ratio, g, device=images.device
    )
    flip = _bernoulli(n, cfg.flip_p, images, g) if cfg.flip_p > 0 else None
    if boxes is None:
        x = hflip(images, flip) if flip is not None else images
    else:
        x = resized_crop(images, boxes, cfg.size, flip)

    jitter = (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    if cfg.jitter_p > 0 and any(jitter):
        apply = _bernoulli(n, cfg.jitter_p, x, g)
        order = torch.rand(n, 4, device=x.device, generator=g).argsort(dim=1)  # randperm(4) each
        b, co, s, h = jitter
        x = color_jitter(
            x,
            _uniform(n, max(0.0, 1 - b), 1 + b, x, g) if b > 0 else None,
            _uniform(n, max(0.0, 1 - co), 1 + co, x, g) if co > 0 else None,
            _uniform(n, max(0.0, 1 - s), 1 + s, x, g) if s > 0 and c == 3 else None,
            _uniform(n, -h, h, x, g) if h > 0 and c == 3 else None,
            order,
            apply,
        )

    if cfg.grayscale_p > 0 and c == 3:
        x = torch.where(
            _bernoulli(n, cfg.grayscale_p, x, g).view(-1, 1, 1, 1), rgb_to_grayscale(x), x
        )

    if cfg.blur_p > 0:
        mask = _bernoulli(n, cfg.blur_p, x, g)
        sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], x, g)
        x = _apply_masked(x, mask, lambda im, sg: gaussian_blur(im, sg, cfg.blur_kernel), sigma)

    if cfg.solarize_p > 0:
        x = solarize(x, cfg.solarize_threshold, _bernoulli(n, cfg.solarize_p, x, g))
    return x


class MultiViewAugment(torch.nn.Module):
    """Produce one randomly augmented, normalised view per ``ViewConfig`` for a whole batch.

    Every sample draws its own parameters in every view, independently across views.
    """

    def __init__(
        self,
        views: Sequence[ViewConfig],
        mean: Sequence[float] | Tensor,
        std: Sequence[float] | Tensor,
    ) -> None:
        super().__init__()
        if len(views) == 0:
            raise ValueError("MultiViewAugment needs at least one ViewConfig")
        for i, v in enumerate(views):
            if not isinstance(v, ViewConfig):
                raise ValueError(f"views[{i}] is a {type(v).__name__}, not a ViewConfig")
        self.views = tuple(views)
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean has {mean_t.numel()} values but std has {std_t.numel()}")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """Augment ``images`` (B, C, H, W), uint8 or float in [0, 1], into one tensor per view.

        Each output is float32 (B, C, size, size), normalised, on the images' device. Pass a
        ``generator`` on that device for reproducible views.
        """
        return [self.forward_one(i, images, generator) for i in range(len(self.views))]

    def forward_one(
        self, view: int, images: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """View number ``view`` of ``images`` only (the file-backed path crops per view first)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be (B, C, H, W) with C in (1, 3), got {tuple(images.shape)}"
            )
        if images.shape[1] != self.mean.numel():
            raise ValueError(
                f"images have {images.shape[1]} channels but mean/std have {self.mean.numel()}"
            )
        _rng_device(generator, images.device)
        x = _to_float(images)
        mean = self.mean.to(x.device).view(-1, 1, 1)
        std = self.std.to(x.device).view(-1, 1, 1)
        cfg = self.views[view]
        with torch.no_grad():
            out = (_augment_view(x, cfg, generator) - mean) / std
            if cfg.erase_p > 0:
                out = random_erase(out, _bernoulli(len(out), cfg.erase_p, out, generator),
                                   cfg.erase_scale, cfg.erase_ratio, generator)
            return out

    def extra_repr(self) -> str:
        return f"views={len(self.views)}"


# --------------------------------------------------------------------------------------------
# Per-dataset recipes (docs/recipes.md §3)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """One dataset's row of the ``shared`` family plus the size and scale of its multi-crop
    local crops. The ``shared`` view is RandomResizedCrop(``crop_scale``, ``crop_ratio``) ->
    flip(``flip_p``) -> ColorJitter(``brightness``, ``contrast``, ``saturation``, ``hue``) with
    p 0.8 -> grayscale(``grayscale_p``) -> blur(``blur_p``, ``blur_kernel``)."""

    crop_scale: tuple[float, float]
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_p: float
    blur_p: float
    flip_p: float
    local_size: int
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    blur_kernel: int = 9
    local_scale: tuple[float, float] = (0.05, 0.14)


# `shared` family (docs/recipes.md §3, table of the `shared` family), and GroCo's multi-crop
# local sizes (about 96/224 of the global size).
_CIFAR = Recipe(
    crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
    grayscale_p=0.2, blur_p=0.0, flip_p=0.5, local_size=14,
)  # fmt: skip
_IMAGENET = Recipe(
    crop_scale=(0.08, 1.0), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
    grayscale_p=0.2, blur_p=0.5, blur_kernel=23, flip_p=0.5, local_size=96,
)  # fmt: skip
# The MNIST family (chosen; docs/datasets.md): grey 28 px images, so only brightness and contrast
# jitter (saturation, hue and grayscale are no-ops on one channel) and no blur (images <= 64 px).
# Handwritten glyphs (MNIST, KMNIST) take the digits row: a mirrored or mostly cropped-away glyph
# is another glyph. Fashion-MNIST's garments are mirror-symmetric classes, so they flip; the crop
# keeps >= 20 % of the frame, as an 8 % crop of a 28 px image is a 8 x 8 px patch, mostly the
# black background.
_GLYPHS = Recipe(
    crop_scale=(0.5, 1.0), crop_ratio=(0.8, 1.25), brightness=0.4, contrast=0.4, saturation=0.0,
    hue=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0, local_size=12, local_scale=(0.2, 0.5),
)  # fmt: skip
RECIPES: dict[str, Recipe] = {
    # row "digits | (0.5, 1), ratio (0.8, 1.25) | brightness 0.4, contrast 0.4 only | – | 0 | no";
    # local crops of 8 px at scale (0.2, 0.5)
    "digits": dataclasses.replace(_GLYPHS, local_size=8),
    # row "CIFAR-10/100 | (0.08, 1) | (0.4, 0.4, 0.4, 0.1), strength 0.5 | 0.2 | 0 | 0.5"
    "cifar10": _CIFAR,
    "cifar100": _CIFAR,
    # row "STL-10 | (0.08, 1) | (0.4, 0.4, 0.4, 0.1) | 0.2 | 0.5, kernel 9 | 0.5"
    "stl10": dataclasses.replace(_CIFAR, blur_p=0.5, local_size=40),
    # row "Tiny-ImageNet | (0.08, 1) | (0.4, 0.4, 0.4, 0.1) | 0.2 | 0 | 0.5"
    "tinyimagenet": dataclasses.replace(_CIFAR, local_size=28),
    # row "ImageNet-100 | (0.08, 1) | (0.8, 0.8, 0.8, 0.2), strength 1.0 | 0.2 | 0.5, kernel 23 |
    # 0.5"
    "imagenet100": _IMAGENET,
    "imagefolder": _IMAGENET,
    "fashion_mnist": dataclasses.replace(_GLYPHS, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5),
    "mnist": _GLYPHS,
    "kmnist": _GLYPHS,
}
DATASETS = tuple(RECIPES)
# The `official` family (augment=official): each method's published pipeline (docs/recipes.md §3).
OFFICIAL_KINDS = ("simclr", "byol1", "byol2", "mocov2", "mocov2_erase", "cld_basic")
VIEW_KINDS = ("shared", "weak", "global1", "global2", "local", *OFFICIAL_KINDS)

# docs/recipes.md §3: blur is switched off on images of 64 px or less.
_NO_BLUR_MAX_SIZE = 64


def view_config(dataset: str, kind: str, image_size: int) -> ViewConfig:
    """The ``ViewConfig`` of one view kind on one dataset (docs/recipes.md §3).

    Kinds: ``shared`` (the default SimCLR-style family), ``weak`` (ASCL's teacher view),
    ``global1``/``global2``/``local`` (GroCo's DINO-style multi-crop t1, t2 and local crops).
    ``image_size`` is the dataset's training resolution; local crops use their own size.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view kind {kind!r}; valid kinds: {', '.join(VIEW_KINDS)}")
    recipe = RECIPES[dataset]
    if kind in OFFICIAL_KINDS:
        return _official_view(kind, image_size, recipe.blur_kernel)

    if kind == "shared":
        return ViewConfig(
            size=image_size,
            crop_scale=recipe.crop_scale,
            crop_ratio=recipe.crop_ratio,
            flip_p=recipe.flip_p,
            jitter_p=0.8,
            brightness=recipe.brightness,
            contrast=recipe.contrast,
            saturation=recipe.saturation,
            hue=recipe.hue,
            grayscale_p=recipe.grayscale_p,
            blur_p=recipe.blur_p,
            blur_kernel=recipe.blur_kernel,
        )
    if kind == "weak":
        # "RandomResizedCrop(size, scale (0.2, 1)) plus flip (no flip on digits)", after ASCL
        # dataloader.py: default ratio, no colour, no blur.
        return ViewConfig(
            size=image_size,
            crop_scale=(0.2, 1.0),
            flip_p=recipe.flip_p,
            jitter_p=0.0,
            grayscale_p=0.0,
            blur_p=0.0,
        )

    # GroCo multi-crop (DINO-style, after GroCo's dataloader/transforms.py; docs/recipes.md §3):
    # global views scale (0.14, 1), ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, flip; t1
    # blur p 1.0; t2 blur p 0.1 and solarise p 0.2; local crops at the recipe's size and scale
    # ((0.05, 0.14) except on small glyph images), blur p 0.5. Each dataset keeps its shared row's
    # flip (none on digits, MNIST, KMNIST).
    if kind == "local":
        size = recipe.local_size
        crop_scale = recipe.local_scale
        view_blur, solar = 0.5, 0.0
    else:
        size = image_size
        crop_scale = (0.14, 1.0)
        view_blur, solar = (1.0, 0.0) if kind == "global1" else (0.1, 0.2)
    if size <= _NO_BLUR_MAX_SIZE:
        view_blur = 0.0
    return ViewConfig(
        size=size,
        crop_scale=crop_scale,
        flip_p=recipe.flip_p,
        jitter_p=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
        grayscale_p=0.2,
        blur_p=view_blur,
        blur_kernel=recipe.blur_kernel,
        solarize_p=solar,
    )


def _official_view(kind: str, size: int, blur_kernel: int) -> ViewConfig:
    """One view of a method's published pipeline (docs/recipes.md §3, ``official``). All flip
    with p 0.5, convert to grey with p 0.2 and crop with the default aspect ratios; blur σ is
    drawn from [0.1, 2] with the dataset's kernel (9, or 23 at ImageNet size; chosen where the
    official code blurs by radius).

    - ``simclr``: SimCLR (solo-learn's symmetric pipeline, GroCo's SimCLR baseline): scale
      (0.08, 1), ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, blur p 0.5.
    - ``byol1`` / ``byol2``: BYOL's asymmetric pair (NNCLR, All4One): scale (0.08, 1),
      ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, solarise p 0 / 0.2, blur p 1.0 / 0.1 above 64 px
      and none at CIFAR size (solo-learn's CIFAR and ImageNet-100 configs).
    - ``mocov2``: MoCo v2's ``aug_plus`` (MoCo, ASCL's strong view): scale (0.2, 1),
      ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, blur p 0.5 at every size (as CLD's 32-px copy).
    - ``mocov2_erase``: ``aug_plus`` then RandomErasing p 1 after normalisation (CLD's CIFAR-10).
    - ``cld_basic``: CLD's CIFAR-100 pipeline: scale (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.4)
      always, no blur.
    """
    common = {"size": size, "flip_p": 0.5, "grayscale_p": 0.2, "blur_kernel": blur_kernel}
    if kind == "simclr":
        return ViewConfig(**common, crop_scale=(0.08, 1.0), jitter_p=0.8, brightness=0.8,
                          contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.5)
    if kind in ("byol1", "byol2"):
        first = kind == "byol1"
        blur = (1.0 if first else 0.1) if size > _NO_BLUR_MAX_SIZE else 0.0
        return ViewConfig(**common, crop_scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4,
                          contrast=0.4, saturation=0.2, hue=0.1, blur_p=blur,
                          solarize_p=0.0 if first else 0.2)
    if kind == "cld_basic":
        return ViewConfig(**common, crop_scale=(0.2, 1.0), jitter_p=1.0, brightness=0.4,
                          contrast=0.4, saturation=0.4, hue=0.4, blur_p=0.0)
    return ViewConfig(**common, crop_scale=(0.2, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4,
                      saturation=0.4, hue=0.1, blur_p=0.5,
                      erase_p=1.0 if kind == "mocov2_erase" else 0.0)

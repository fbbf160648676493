"""Backbones: any timm model, randomly initialised, with a stem adapted to small images.

``build_backbone("resnet18", in_chans=3, stem="lowres", image_size=32)`` returns a timm model
created with ``num_classes=0`` whose forward pass gives pooled features of size
``model.num_features``. Stems (docs/recipes.md §1):

- ``imagenet``: timm's default.
- ``lowres``: ResNet family — the first stride-2 stem conv becomes 3×3, stride 1, padding 1 and the
  stem max-pool is removed. ViT family — the patch size shrinks so that the token grid of a small
  image matches an ImageNet ViT's (image_size // 8 by default, e.g. 4 px patches at 32 px).
- ``lowres_pool``: ResNet family only; like ``lowres`` but the max-pool is kept.
- ``lowres_pad2``: ResNet family only; like ``lowres`` with padding 2 (solo-learn comparability).

Every plain ``nn.Conv2d`` becomes a ``SinglePixelConv2d`` (``backbones.convolution``): the same
module, which computes a convolution with a one-pixel output as a matrix product on the CPU.

Any other family with a non-``imagenet`` stem is an error that names the supported families: a
silent no-op would train a network that throws away most of a 32-px image in its first layer.
"""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from backbones.convolution import use_single_pixel_convolutions

STEMS = ("imagenet", "lowres", "lowres_pool", "lowres_pad2")
RESNET_STEMS = ("lowres", "lowres_pool", "lowres_pad2")
VIT_STEMS = ("lowres",)
# timm modules whose models are plain patch-embedding transformers with `img_size`/`patch_size`.
VIT_MODULES = ("vision_transformer", "deit", "beit", "eva")


class BackboneError(ValueError):
    """A backbone name or stem that cannot be built; the message lists what is valid."""


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise BackboneError(
        f"unknown timm model {name!r}.{hint} Any name from timm.list_models() is valid, "
        "e.g. resnet18, resnet50, test_resnet, vit_tiny_patch16_224."
    )


def is_vit(name: str) -> bool:
    return timm.models.is_model_in_modules(name, list(VIT_MODULES))


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """The first stride-2 convolution of a ResNet stem and where it lives (parent, attribute)."""
    conv1 = model.conv1
    if isinstance(conv1, nn.Conv2d):
        return model, "conv1", conv1
    if isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d):
        return conv1, "0", conv1[0]
    raise BackboneError(f"unrecognised ResNet stem {type(conv1).__name__}")


def _adapt_resnet_stem(model: nn.Module, stem: str) -> None:
    parent, attr, conv = _first_conv(model)
    padding = 2 if stem == "lowres_pad2" else 1
    # Deep stems (3×3 convs already) keep their kernel; only the stride and padding change.
    new_conv = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=3,
        stride=1,
        padding=padding,
        bias=conv.bias is not None,
    )
    setattr(parent, attr, new_conv)
    if stem in ("lowres", "lowres_pad2"):
        model.maxpool = nn.Identity()


def build_backbone(
    name: str,
    in_chans: int = 3,
    stem: str = "imagenet",
    image_size: int | None = None,
    patch_size: int | None = None,
    **timm_kwargs: object,
) -> nn.Module:
    """Create ``timm.create_model(name, num_classes=0, pretrained=False)`` with the given stem.

    ``image_size`` is required for ViTs (their position table is sized for it) and is used to pick
    the low-resolution patch size. Weights are random: nothing is downloaded.
    """
    _check_name(name)
    if stem not in STEMS:
        raise BackboneError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")
    kwargs: dict[str, object] = dict(timm_kwargs)
    vit = is_vit(name)
    if vit and image_size is not None:
        kwargs["img_size"] = image_size
        if stem == "lowres":
            kwargs["patch_size"] = patch_size or max(1, image_size // 8)
        elif patch_size is not None:
            kwargs["patch_size"] = patch_size
    if vit and stem not in ("imagenet",) + VIT_STEMS:
        raise BackboneError(
            f"stem {stem!r} is not defined for ViT model {name!r}; ViTs support "
            f"{', '.join(('imagenet',) + VIT_STEMS)}"
        )
    if vit and stem == "lowres" and image_size is None:
        raise BackboneError("stem 'lowres' for a ViT needs image_size to choose the patch size")
    try:
        model = timm.create_model(
            name, num_classes=0, pretrained=False, in_chans=in_chans, **kwargs
        )
    except TypeError as exc:
        raise BackboneError(f"timm model {name!r} rejected its arguments {kwargs}: {exc}") from exc
    if stem != "imagenet" and not vit:
        if hasattr(model, "conv1") and hasattr(model, "maxpool"):
            _adapt_resnet_stem(model, stem)
        else:
            raise BackboneError(
                f"stem {stem!r} is only defined for the ResNet family (models with conv1 and "
                f"maxpool: resnet*, resnext*, test_resnet, …) and ViTs ('lowres' via the patch "
                f"size); {name!r} is a {type(model).__name__}. Use stem=imagenet for it."
            )
    use_single_pixel_convolutions(model)
    if image_size is not None:
        check_image_size(model, name, stem, in_chans, image_size)
    return model


def check_image_size(model: nn.Module, name: str, stem: str, in_chans: int, image_size: int) -> None:
    """Refuse an input size whose feature map vanishes (or that the model cannot take at all)."""
    try:
        shape = feature_map_size(model, in_chans, image_size)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise BackboneError(
            f"image size {image_size} px is too small for backbone {name!r} with stem {stem!r}: "
            f"{str(exc).splitlines()[0]}. Use a larger image size or a low-resolution stem "
            f"({', '.join(RESNET_STEMS)} for ResNets, lowres for ViTs)."
        ) from None
    if any(dim == 0 for dim in shape):
        raise BackboneError(
            f"image size {image_size} px is too small for backbone {name!r} with stem {stem!r}: "
            f"its last feature map would be {shape}. Use a larger image size or a low-resolution stem."
        )
    if len(shape) == 3:
        # A CNN pads its way to a 1×1 map however small the input; refuse inputs smaller than the
        # network's total stride, where the last stages see mostly padding.
        probe = 256
        side = feature_map_size(model, in_chans, probe)[-1]
        reduction = probe // max(side, 1)
        if image_size < reduction:
            raise BackboneError(
                f"image size {image_size} px is smaller than the total stride {reduction} of "
                f"backbone {name!r} with stem {stem!r}; use images of at least {reduction} px or "
                f"a low-resolution stem ({', '.join(RESNET_STEMS)} for ResNets)."
            )


def feature_map_size(model: nn.Module, in_chans: int, image_size: int) -> tuple[int, ...]:
    """Shape of the last feature map for one image, to reject inputs too small for a backbone."""
    with torch.no_grad():
        was_training = model.training
        model.eval()
        out = model.forward_features(torch.zeros(1, in_chans, image_size, image_size))
        model.train(was_training)
    return tuple(out.shape[1:])

"""Backbones per family: ResNet stems, ViT patch-size stem, other families refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backbones import BackboneError, build_backbone


def first_conv(model):
    conv = model.conv1
    return conv[0] if isinstance(conv, nn.Sequential) else conv


@pytest.mark.parametrize(
    "stem,stride,padding,pool,side",
    [("imagenet", 2, 3, True, 1), ("lowres", 1, 1, False, 4), ("lowres_pool", 1, 1, True, 2),
     ("lowres_pad2", 1, 2, False, 5)],
)
def test_resnet18_stems(stem, stride, padding, pool, side):
    model = build_backbone("resnet18", in_chans=3, stem=stem)
    conv = first_conv(model)
    assert conv.stride == (stride, stride) and conv.padding == (padding, padding)
    assert conv.kernel_size == ((7, 7) if stem == "imagenet" else (3, 3))
    assert isinstance(model.maxpool, nn.MaxPool2d) is pool
    assert model.num_features == 512
    x = torch.zeros(2, 3, 32, 32)
    # final feature map side at 32 px: 1 (ImageNet stem), 4 (lowres), 2 (max-pool kept), 5 (pad 2)
    assert model.forward_features(x).shape[-1] == side
    assert model(x).shape == (2, 512)


def test_deep_stem_changes_only_first_conv_stride():
    model = build_backbone("test_resnet", in_chans=1, stem="lowres_pool")
    seq = model.conv1
    assert isinstance(seq, nn.Sequential)
    assert seq[0].stride == (1, 1) and seq[0].in_channels == 1
    assert seq[3].stride == (1, 1) and seq[6].stride == (1, 1)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, model.num_features) == (2, 96)


def test_vit_lowres_shrinks_patches():
    model = build_backbone("vit_tiny_patch16_224", stem="lowres", image_size=32)
    assert model.patch_embed.proj.kernel_size == (4, 4)
    assert model.patch_embed.num_patches == 64
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, model.num_features) == (2, 192)
    plain = build_backbone("vit_tiny_patch16_224", stem="imagenet", image_size=64)
    assert plain.patch_embed.proj.kernel_size == (16, 16) and plain.patch_embed.num_patches == 16


def test_other_families_refuse_lowres_stems():
    with pytest.raises(BackboneError, match="ResNet family"):
        build_backbone("convnext_atto", stem="lowres")
    with pytest.raises(BackboneError, match="lowres_pool"):
        build_backbone("vit_tiny_patch16_224", stem="lowres_pool", image_size=32)
    assert build_backbone("convnext_atto", stem="imagenet").num_features == 320


def test_unknown_names_and_stems():
    with pytest.raises(BackboneError, match="resnet18") as err:
        build_backbone("resnet81")
    assert "resnet81" in str(err.value)
    with pytest.raises(BackboneError, match="valid stems: imagenet, lowres"):
        build_backbone("resnet18", stem="tiny")

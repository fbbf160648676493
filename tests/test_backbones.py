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


SINGLE_PIXEL_GEOMETRIES = [
    # (in, out, size, kernel, stride, padding): every output is 1 × 1
    (12, 6, 2, 3, 2, 1),   # test_resnet's layer4.conv1 on 16-px digits
    (6, 6, 1, 3, 1, 1),    # its layer4.conv2: only the centre tap sees the input
    (5, 4, 1, 1, 1, 0),    # a 1×1 downsample on a 1×1 map
    (3, 4, 4, 3, 2, 0),    # no padding: the window is the top-left 3 × 3 block
    (3, 2, 3, 5, 3, 2),    # padding 2, window rows −2..2
    (4, 3, (2, 3), (3, 2), (2, 3), (1, 0)),  # rectangular everything
]


def _conv_pair(cin, cout, kernel, stride, padding, bias):
    from backbones.convolution import SinglePixelConv2d

    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, kernel, stride, padding, bias=bias).double()
    fast = SinglePixelConv2d(cin, cout, kernel, stride, padding, bias=bias).double()
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def _count_library_convolutions(monkeypatch):
    calls = []
    original = nn.Conv2d._conv_forward

    def counted(self, x, weight, bias):
        calls.append(tuple(x.shape[-2:]))
        return original(self, x, weight, bias)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", counted)
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cin,cout,size,kernel,stride,padding", SINGLE_PIXEL_GEOMETRIES)
def test_single_pixel_convolution_matches_conv2d_forward_and_backward(
    cin, cout, size, kernel, stride, padding, bias, channels_last, monkeypatch
):
    plain, fast = _conv_pair(cin, cout, kernel, stride, padding, bias)
    height, width = (size, size) if isinstance(size, int) else size
    x = torch.randn(7, cin, height, width, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        plain, fast = (m.to(memory_format=torch.channels_last) for m in (plain, fast))
    x_plain, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = plain(x_plain)
    calls = _count_library_convolutions(monkeypatch)
    got = fast(x_fast)
    assert calls == [], "a single-pixel output must not go through the library convolution"
    assert expected.shape[-2:] == (1, 1) and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    got.backward(upstream)
    torch.testing.assert_close(x_fast.grad, x_plain.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,size,device,out_side",
    [
        ({}, 3, "cpu", 3),
        ({"stride": 2}, 4, "cpu", 2),
        ({"groups": 2, "stride": 2}, 2, "cpu", 1),           # grouped
        ({"dilation": 2, "padding": 2}, 1, "cpu", 1),        # dilated
        ({"padding_mode": "reflect", "stride": 2}, 2, "cpu", 1),  # padding that is not zeros
        ({"padding": "same"}, 1, "cpu", 1),                  # string padding
        ({"padding": 3, "stride": 5}, 1, "cpu", 1),          # the window sees only padding
        ({}, 1, "meta", 1),                                  # another device
    ],
)
def test_other_convolutions_take_the_library_path(kwargs, size, device, out_side, monkeypatch):
    from backbones.convolution import SinglePixelConv2d

    options = {"stride": 1, "padding": 1} | kwargs
    conv = SinglePixelConv2d(4, 4, 3, **options, device=device)
    calls = _count_library_convolutions(monkeypatch)
    out = conv(torch.randn(2, 4, size, size, device=device))
    assert len(calls) == 1 and out.shape == (2, 4, out_side, out_side)


def test_backbones_keep_timms_weights_and_route_one_pixel_outputs_to_the_fast_path(monkeypatch):
    import backbones
    from backbones.convolution import SinglePixelConv2d

    with monkeypatch.context() as patch:
        patch.setattr(backbones, "use_single_pixel_convolutions", lambda model: model)
        torch.manual_seed(3)
        reference = build_backbone("test_resnet", in_chans=1, stem="lowres_pool", image_size=16)
        rng_after_reference = torch.get_rng_state()
    assert all(type(m) is not SinglePixelConv2d for m in reference.modules())
    torch.manual_seed(3)
    model = build_backbone("test_resnet", in_chans=1, stem="lowres_pool", image_size=16)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is SinglePixelConv2d for m in convs)
    # the class change draws nothing: timm's weights, keys and the RNG stream after the build
    assert torch.equal(torch.get_rng_state(), rng_after_reference)
    assert reference.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in
               zip(reference.state_dict().values(), model.state_dict().values(), strict=True))
    x = torch.randn(4, 1, 16, 16)
    calls = _count_library_convolutions(monkeypatch)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    # layer4 (2×2 → 1×1, 1×1 → 1×1, and its 1×1 downsample on a 1×1 map) takes the product
    assert len(calls) == len(convs) - 3 + len(convs)  # the model's calls, then the reference's
    assert (1, 1) not in calls[: len(convs) - 3]

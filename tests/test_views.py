"""Batched multi-view augmentation (datasets/views.py) against torchvision's per-sample ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2 as T2
import torchvision.transforms.v2.functional as TF
from scipy.stats import ks_2samp

from datasets import ops
from datasets import views as V
from datasets.views import (
    VIEW_KINDS,
    MultiViewAugment,
    ViewConfig,
    eval_view,
    normalize,
    resized_crop,
    sample_crop_boxes,
    view_config,
)

# The draws here are seeded, so each KS p-value is a fixed number; the threshold only has to
# separate "same distribution" from a real semantic difference.
KS_MIN_P = 1e-3

MEAN3, STD3 = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)


@pytest.fixture(autouse=True)
def _light_threads():
    # The test machine has two shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tv_boxes(height: int, width: int, n: int, scale, ratio, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    img = torch.empty(1, height, width)
    return np.array([T1.RandomResizedCrop.get_params(img, scale, ratio) for _ in range(n)])


def _our_boxes(height: int, width: int, n: int, scale, ratio, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return sample_crop_boxes(height, width, n, scale, ratio, g).numpy()


# --------------------------------------------------------------------------------------------
# (1) crop-box parameter distributions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height,width,scale,ratio",
    [
        (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
        (16, 16, (0.5, 1.0), (0.8, 1.25)),
        # Wide image where most tries are rejected, so the fallback and the "first accepted try"
        # rule carry real probability mass.
        (24, 64, (0.4, 0.7), (3 / 4, 4 / 3)),
    ],
)
def test_crop_boxes_match_torchvision_distribution(height, width, scale, ratio):
    ours = _our_boxes(height, width, 20000, scale, ratio, seed=0)
    ref = _tv_boxes(height, width, 3000, scale, ratio, seed=0)
    assert ours.dtype == np.int64 and ours.shape == (20000, 4)
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    for col, name in enumerate(("top", "left", "h", "w")):
        p = ks_2samp(ours[:, col], ref[:, col]).pvalue
        assert p > KS_MIN_P, f"{name}: KS p={p:.2g}"
    area = ours[:, 2] * ours[:, 3] / (height * width)
    ref_area = ref[:, 2] * ref[:, 3] / (height * width)
    se = math.sqrt(area.var() / len(area) + ref_area.var() / len(ref_area))
    assert abs(area.mean() - ref_area.mean()) <= 4 * se


def test_crop_boxes_ranges_on_large_image():
    # On a large image rounding is negligible, so area and aspect stay inside the drawn ranges.
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = _our_boxes(1000, 1000, 20000, scale, ratio, seed=1).astype(np.float64)
    area = boxes[:, 2] * boxes[:, 3] / 1e6
    aspect = boxes[:, 3] / boxes[:, 2]
    assert area.min() >= scale[0] - 2e-3 and area.max() <= scale[1]
    assert aspect.min() >= ratio[0] - 5e-3 and aspect.max() <= ratio[1] + 5e-3
    # log-uniform aspect: the log ratio is symmetric around 0 for a symmetric range.
    assert abs(np.log(aspect).mean()) < 0.01


@pytest.mark.parametrize(
    "height,width,ratio", [(10, 100, (1.0, 1.0)), (100, 10, (1.0, 1.0)), (10, 12, (3.0, 4.0))]
)
def test_crop_boxes_fallback_is_torchvision_central_crop(height, width, ratio):
    # No try can be accepted here, so every sample takes the fallback.
    scale = (0.9, 1.0) if ratio == (3.0, 4.0) else (0.5, 1.0)
    ours = _our_boxes(height, width, 50, scale, ratio, seed=0)
    ref = _tv_boxes(height, width, 1, scale, ratio, seed=0)[0]
    assert (ours == ref).all(), (ours[0], ref)


def test_crop_boxes_generator_determinism():
    a = _our_boxes(32, 32, 64, (0.08, 1.0), (3 / 4, 4 / 3), seed=5)
    b = _our_boxes(32, 32, 64, (0.08, 1.0), (3 / 4, 4 / 3), seed=5)
    c = _our_boxes(32, 32, 64, (0.08, 1.0), (3 / 4, 4 / 3), seed=6)
    assert (a == b).all() and not (a == c).all()


# --------------------------------------------------------------------------------------------
# (2) single-sample agreement with torchvision's functional ops
# --------------------------------------------------------------------------------------------


def _images(n=6, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g)


def test_resized_crop_matches_torchvision_upsampling():
    # Crops no larger than the output: torchvision's default (antialiased) resize agrees.
    images = _images(h=32, w=40)
    boxes = torch.tensor(
        [
            [0, 0, 32, 32],
            [3, 5, 10, 12],
            [7, 2, 20, 25],
            [0, 8, 32, 32],
            [31, 39, 1, 1],
            [1, 0, 5, 31],
        ]
    )
    out = resized_crop(images, boxes, 32)
    assert out.shape == (6, 3, 32, 32)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(images[i], top, left, h, w, [32, 32])
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_resized_crop_matches_torchvision_downsampling_without_antialias():
    images = _images(h=48, w=40)
    boxes = torch.tensor(
        [
            [0, 0, 48, 40],
            [3, 5, 30, 20],
            [10, 2, 16, 37],
            [0, 0, 17, 17],
            [5, 5, 40, 9],
            [1, 1, 2, 2],
        ]
    )
    out = resized_crop(images, boxes, 14)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(images[i], top, left, h, w, [14, 14], antialias=False)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [32, 14])
def test_resized_crop_flip_is_hflip_of_its_output(size):
    images = _images(h=48, w=40)
    boxes = torch.tensor(
        [[0, 0, 48, 40], [3, 5, 30, 20], [10, 2, 16, 37], [0, 0, 17, 17], [5, 5, 40, 9], [1, 1, 2, 2]]
    )
    flip = torch.tensor([True, False, True, True, False, True])
    out = resized_crop(images, boxes, size, flip)
    assert torch.equal(out, V.hflip(resized_crop(images, boxes, size), flip))
    assert not torch.equal(out, resized_crop(images, boxes, size))


def test_hflip_matches_torchvision():
    images = _images()
    mask = torch.tensor([True, False, True, False, False, True])
    out = V.hflip(images, mask)
    for i in range(len(images)):
        ref = TF.horizontal_flip(images[i]) if mask[i] else images[i]
        torch.testing.assert_close(out[i], ref, atol=0, rtol=0)


FACTORS = torch.tensor([0.0, 0.4, 0.93, 1.0, 1.37, 1.8])


@pytest.mark.parametrize(
    "ours,ref",
    [
        (V.adjust_brightness, TF.adjust_brightness),
        (V.adjust_contrast, TF.adjust_contrast),
        (V.adjust_saturation, TF.adjust_saturation),
    ],
    ids=["brightness", "contrast", "saturation"],
)
@pytest.mark.parametrize("channels", [3, 1])
def test_blend_ops_match_torchvision(ours, ref, channels):
    images = _images(c=channels)
    out = ours(images, FACTORS)
    for i, f in enumerate(FACTORS.tolist()):
        torch.testing.assert_close(out[i], ref(images[i], f), atol=1e-5, rtol=0)


def test_hue_matches_torchvision():
    images = _images()
    # Include grey pixels and saturated primaries, where the HSV conversion has special cases.
    images[0, :, :4] = 0.5
    images[1, :, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    images[1, :, 4:8] = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1)
    # Ties for the maximum (Pillow's rule picks r, then g), black, and a near-grey pixel.
    images[2, :, :2] = torch.tensor([0.7, 0.7, 0.2]).view(3, 1, 1)
    images[2, :, 2:4] = torch.tensor([0.1, 0.6, 0.6]).view(3, 1, 1)
    images[2, :, 4:6] = torch.tensor([0.8, 0.3, 0.8]).view(3, 1, 1)
    images[3, :, :2] = 0.0
    images[3, :, 2:4] = torch.tensor([0.5, 0.5, 0.5 + 1e-6]).view(3, 1, 1)
    factors = torch.tensor([-0.5, -0.23, -0.1, 0.0, 0.1, 0.5])
    out = V.adjust_hue(images, factors)
    for i, f in enumerate(factors.tolist()):
        torch.testing.assert_close(out[i], TF.adjust_hue(images[i], f), atol=1e-5, rtol=0)
    gray = _images(c=1)
    assert torch.equal(V.adjust_hue(gray, factors), gray)


def test_hue_matches_torchvision_over_a_sweep_of_shifts():
    g = torch.Generator().manual_seed(5)
    # Quantised colours, as decoded uint8 images are: many ties between channels.
    image = torch.randint(0, 256, (3, 16, 16), generator=g).float() / 255
    factors = torch.linspace(-0.5, 0.5, 41)
    out = V.adjust_hue(image.expand(len(factors), -1, -1, -1), factors)
    for i, f in enumerate(factors.tolist()):
        torch.testing.assert_close(out[i], TF.adjust_hue(image, f), atol=1e-5, rtol=0)


def test_grayscale_matches_torchvision():
    images = _images()
    out = V.rgb_to_grayscale(images)
    assert out.shape == images.shape
    torch.testing.assert_close(out, TF.rgb_to_grayscale(images, 3), atol=1e-6, rtol=0)
    one = _images(c=1)
    assert torch.equal(V.rgb_to_grayscale(one), one)


@pytest.mark.parametrize("kernel", [9, 23])
def test_gaussian_blur_matches_torchvision(kernel):
    images = _images(c=3, h=32, w=28)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.3, 1.9, 2.0])
    out = V.gaussian_blur(images, sigma, kernel)
    for i, s in enumerate(sigma.tolist()):
        ref = TF.gaussian_blur(images[i], [kernel, kernel], [s, s])
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    # v1's kernel formula is the one the docstring cites; it must agree with v2's as well.
    ref_v1 = T1.functional.gaussian_blur(images[3], [kernel, kernel], [1.3, 1.3])
    torch.testing.assert_close(out[3], ref_v1, atol=1e-5, rtol=0)


def test_solarize_matches_torchvision():
    images = _images()
    mask = torch.tensor([True, True, False, True, False, True])
    out = V.solarize(images, 0.5, mask)
    for i in range(len(images)):
        ref = TF.solarize(images[i], 0.5) if mask[i] else images[i]
        torch.testing.assert_close(out[i], ref, atol=0, rtol=0)


def test_color_jitter_follows_per_sample_order():
    images = _images(n=8)
    g = torch.Generator().manual_seed(3)
    b, c, s = (0.6 + 0.8 * torch.rand(8, generator=g) for _ in range(3))
    h = 0.2 * torch.rand(8, generator=g) - 0.1
    order = torch.rand(8, 4, generator=g).argsort(dim=1)
    apply = torch.tensor([True, True, False, True, True, True, False, True])
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for dense in (False, True):
        orig = ops._apply_masked
        ops._apply_masked = lambda *a, _o=orig, _d=dense, **k: _o(*a, **{**k, "dense": _d})
        before = images.clone()
        try:
            out = ops.color_jitter(images, b, c, s, h, order, apply)
        finally:
            ops._apply_masked = orig
        # The masked ops write in place into the jitter's own copy, never into its input.
        assert torch.equal(images, before)
        for i in range(8):
            ref = images[i]
            if apply[i]:
                factors = (b[i].item(), c[i].item(), s[i].item(), h[i].item())
                for op in order[i].tolist():
                    ref = fns[op](ref, factors[op])
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_normalize_and_eval_view_match_torchvision():
    images = (_images() * 255).to(torch.uint8)
    ref = TF.normalize(images.float() / 255, list(MEAN3), list(STD3))
    torch.testing.assert_close(eval_view(images, MEAN3, STD3), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize(images.float() / 255, MEAN3, STD3), ref)
    with pytest.raises(ValueError, match="mean has 1 values"):
        normalize(images, (0.5,), STD3)


# --------------------------------------------------------------------------------------------
# (3) the whole MultiViewAugment
# --------------------------------------------------------------------------------------------


def _uint8_batch(n=32, c=3, size=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


def test_multiview_shapes_dtype_device_and_determinism():
    views = [
        ViewConfig(
            size=32,
            brightness=0.4,
            contrast=0.4,
            saturation=0.4,
            hue=0.1,
            blur_p=0.5,
            solarize_p=0.2,
        ),
        view_config("cifar10", "local", 32),
    ]
    aug = MultiViewAugment(views, MEAN3, STD3)
    images = _uint8_batch()
    out = aug(images, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in out] == [(32, 3, 32, 32), (32, 3, 14, 14)]
    assert all(v.dtype == torch.float32 and v.device == images.device for v in out)
    again = aug(images, torch.Generator().manual_seed(0))
    other = aug(images, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
    assert not torch.equal(out[0], other[0])
    # uint8 input is the float input / 255.
    as_float = aug(images.float() / 255, torch.Generator().manual_seed(0))
    torch.testing.assert_close(as_float[0], out[0], atol=1e-5, rtol=0)


def test_multiview_samples_and_views_draw_independently():
    # One image repeated: any difference between rows comes from per-sample parameters.
    cfg = view_config("cifar10", "shared", 32)
    images = _uint8_batch(n=1).expand(16, -1, -1, -1)
    v1, v2 = MultiViewAugment([cfg, cfg], MEAN3, STD3)(images, torch.Generator().manual_seed(0))
    flat = v1.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16) * 1e9).min() > 1e-3
    assert not torch.equal(v1, v2)


@pytest.mark.parametrize("size", [16, 40, 96])
def test_multiview_identity_config_is_normalisation(size):
    # Exactly: resampling a whole image at its own size is off by up to ~1e-5 at 96 px.
    cfg = ViewConfig(
        size=size,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        grayscale_p=0.0,
    )
    images = _uint8_batch(n=4, size=size)
    (out,) = MultiViewAugment([cfg], MEAN3, STD3)(images)
    assert torch.equal(out, eval_view(images, MEAN3, STD3))


def test_multiview_op_probabilities():
    # Full-image crops make flips and grayscale directly observable per sample.
    n = 4000
    images = _uint8_batch(n=1, size=8).expand(n, -1, -1, -1)
    cfg = ViewConfig(
        size=8,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0.5,
        jitter_p=0.0,
        grayscale_p=0.2,
    )
    (out,) = MultiViewAugment([cfg], (0.0,) * 3, (1.0,) * 3)(
        images, torch.Generator().manual_seed(0)
    )
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    base = images[0].float() / 255
    flipped = (out - base.flip(-1)).abs().flatten(1).amax(1) < 1e-6
    flipped |= (out - V.rgb_to_grayscale(base.flip(-1)[None])).abs().flatten(1).amax(1) < 1e-6
    se = lambda p: 4 * math.sqrt(p * (1 - p) / n)  # noqa: E731
    assert abs(gray.float().mean().item() - 0.2) < se(0.2)
    assert abs(flipped.float().mean().item() - 0.5) < se(0.5)


def test_multiview_matches_torchvision_pipeline_statistically():
    # Same images through the batched module and torchvision's per-sample v2 pipeline: the
    # per-view pixel mean and std must follow the same distributions. Crops are never larger
    # than the output here, so antialiasing plays no part.
    n = 1000
    cfg = ViewConfig(
        size=16,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        grayscale_p=0.2,
        blur_p=0.5,
        blur_kernel=5,
        solarize_p=0.2,
    )
    base = _images(n=4, h=16, w=16, seed=1)
    images = base.repeat(n // 4, 1, 1, 1)
    (ours,) = MultiViewAugment([cfg], (0.0,) * 3, (1.0,) * 3)(
        images, torch.Generator().manual_seed(0)
    )
    tv = T2.Compose(
        [
            T2.RandomResizedCrop(16, scale=cfg.crop_scale, ratio=cfg.crop_ratio),
            T2.RandomHorizontalFlip(cfg.flip_p),
            T2.RandomApply([T2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=cfg.jitter_p),
            T2.RandomGrayscale(cfg.grayscale_p),
            T2.RandomApply([T2.GaussianBlur(5, cfg.blur_sigma)], p=cfg.blur_p),
            T2.RandomSolarize(cfg.solarize_threshold, p=cfg.solarize_p),
        ]
    )
    torch.manual_seed(0)
    ref = torch.stack([tv(im) for im in images])
    for stat in (
        lambda x: x.mean((1, 2, 3)),
        lambda x: x.std((1, 2, 3)),
        lambda x: x.std(1).mean((1, 2)),  # colourfulness: grayscale and saturation
        lambda x: (x[:, 0] - x[:, 2]).mean((1, 2)),
    ):
        p = ks_2samp(stat(ours).numpy(), stat(ref).numpy()).pvalue
        assert p > KS_MIN_P, f"KS p={p:.2g}"


def test_multiview_jitter_and_blur_parameter_draws(monkeypatch):
    # Capture what the pipeline draws: ColorJitter's ranges, randperm-like orders, RandomApply.
    seen = {}

    def spy_jitter(images, b, c, s, h, order, apply):
        seen.update(b=b, c=c, s=s, h=h, order=order, apply=apply)
        return images

    def spy_blur(images, sigma, kernel):
        seen.setdefault("sigma", []).append(sigma)
        seen["kernel"] = kernel
        return images

    monkeypatch.setattr(V, "color_jitter", spy_jitter)
    monkeypatch.setattr(V, "gaussian_blur", spy_blur)
    n = 6000
    cfg = ViewConfig(
        size=8, brightness=0.4, contrast=1.5, saturation=0.2, hue=0.1, blur_p=0.5, blur_kernel=5
    )
    MultiViewAugment([cfg], MEAN3, STD3)(
        _uint8_batch(n=n, size=8), torch.Generator().manual_seed(0)
    )
    for key, lo, hi in (("b", 0.6, 1.4), ("c", 0.0, 2.5), ("s", 0.8, 1.2), ("h", -0.1, 0.1)):
        x = seen[key].double()
        assert lo <= x.min() and x.max() <= hi
        assert abs(x.mean().item() - (lo + hi) / 2) < 4 * (hi - lo) / math.sqrt(12 * n)
        assert ks_2samp(x.numpy(), np.random.default_rng(0).uniform(lo, hi, n)).pvalue > KS_MIN_P
    order = seen["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    # All 24 permutations, roughly equally often.
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[torch.unique(codes)]
    assert len(counts) == 24 and counts.min() > n / 24 * 0.7
    assert abs(seen["apply"].float().mean().item() - 0.8) < 4 * math.sqrt(0.16 / n)
    # Blur runs on its Bernoulli(0.5) subset with sigma ~ U(0.1, 2).
    (sigma,) = seen["sigma"]
    assert seen["kernel"] == 5 and abs(len(sigma) / n - 0.5) < 4 * math.sqrt(0.25 / n)
    assert ks_2samp(sigma.numpy(), np.random.default_rng(1).uniform(0.1, 2.0, n)).pvalue > KS_MIN_P


def test_multiview_single_channel_digits():
    views = [view_config("digits", k, 16) for k in VIEW_KINDS]
    images = _images(n=8, c=1, h=16, w=16)
    out = MultiViewAugment(views, (0.3,), (0.2,))(images, torch.Generator().manual_seed(0))
    # shared, weak, global1, global2, local (8 px), then the official kinds at full size
    assert [v.shape[-1] for v in out] == [16, 16, 16, 16, 8] + [16] * len(V.OFFICIAL_KINDS)
    assert all(v.shape[1] == 1 and torch.isfinite(v).all() for v in out)


def test_multiview_rejects_bad_input():
    aug = MultiViewAugment([ViewConfig(size=8)], MEAN3, STD3)
    with pytest.raises(ValueError, match="channels"):
        aug(_images(c=1, h=8, w=8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        aug(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="std must be positive"):
        MultiViewAugment([ViewConfig(size=8)], MEAN3, (0.1, 0.0, 0.1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_multiview_cuda_matches_cpu_semantics():
    cfg = view_config("stl10", "shared", 32)
    images = _uint8_batch().cuda()
    out = MultiViewAugment([cfg], MEAN3, STD3)(images, torch.Generator("cuda").manual_seed(0))
    assert out[0].device == images.device and out[0].shape == (32, 3, 32, 32)
    with pytest.raises(ValueError, match="generator"):
        MultiViewAugment([cfg], MEAN3, STD3)(images, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------
# (4) ViewConfig validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("size", 0),
        ("size", 3.5),
        ("crop_scale", (0.5, 0.2)),
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.5, 1.5)),
        ("crop_ratio", (2.0, 1.0)),
        ("crop_ratio", (1.0,)),
        ("flip_p", 1.5),
        ("jitter_p", -0.1),
        ("grayscale_p", 2),
        ("brightness", -0.4),
        ("hue", 0.6),
        ("blur_kernel", 8),
        ("blur_sigma", (0.0, 2.0)),
        ("solarize_p", -1),
        ("solarize_threshold", 1.5),
        ("erase_p", 1.2),
        ("erase_scale", (0.5, 0.2)),
        ("erase_ratio", (0.0, 3.3)),
    ],
)
def test_view_config_validation(field, value):
    with pytest.raises(ValueError, match=f"ViewConfig.{field}=") as err:
        ViewConfig(size=32, **{field: value}) if field != "size" else ViewConfig(size=value)
    assert str(value) in str(err.value) or repr(value) in str(err.value)


def test_view_config_blur_kernel_must_fit_image():
    ViewConfig(size=8, blur_kernel=23)  # blur off: the kernel is never used
    with pytest.raises(ValueError, match="blur_kernel=23.*size \\(8\\)"):
        ViewConfig(size=8, blur_p=0.5, blur_kernel=23)


def test_view_config_coerces_yaml_lists():
    cfg = ViewConfig(size=32, crop_scale=[0.2, 1], brightness=1)
    assert cfg.crop_scale == (0.2, 1.0) and cfg == ViewConfig(
        size=32, crop_scale=(0.2, 1.0), brightness=1.0
    )
    hash(cfg)


# --------------------------------------------------------------------------------------------
# (5) the docs/recipes.md §3 table
# --------------------------------------------------------------------------------------------


def test_view_config_shared_rows():
    cifar = view_config("cifar10", "shared", 32)
    assert (cifar.size, cifar.crop_scale, cifar.flip_p, cifar.jitter_p) == (
        32,
        (0.08, 1.0),
        0.5,
        0.8,
    )
    assert (cifar.brightness, cifar.contrast, cifar.saturation, cifar.hue) == (0.4, 0.4, 0.4, 0.1)
    assert (cifar.grayscale_p, cifar.blur_p, cifar.solarize_p) == (0.2, 0.0, 0.0)
    assert view_config("cifar100", "shared", 32) == cifar

    digits = view_config("digits", "shared", 16)
    assert (digits.crop_scale, digits.crop_ratio) == ((0.5, 1.0), (0.8, 1.25))
    assert (digits.brightness, digits.contrast, digits.saturation, digits.hue) == (0.4, 0.4, 0, 0)
    assert (digits.grayscale_p, digits.blur_p, digits.flip_p) == (0.0, 0.0, 0.0)

    stl = view_config("stl10", "shared", 96)
    assert (stl.blur_p, stl.blur_kernel, stl.blur_sigma) == (0.5, 9, (0.1, 2.0))
    inet = view_config("imagenet100", "shared", 224)
    assert (inet.brightness, inet.contrast, inet.saturation, inet.hue) == (0.8, 0.8, 0.8, 0.2)
    assert (inet.blur_p, inet.blur_kernel) == (0.5, 23)
    assert view_config("imagefolder", "shared", 224) == inet


def test_view_config_weak_and_multicrop_rows():
    weak = view_config("cifar10", "weak", 32)
    assert (weak.crop_scale, weak.flip_p, weak.jitter_p, weak.grayscale_p, weak.blur_p) == (
        (0.2, 1.0),
        0.5,
        0.0,
        0.0,
        0.0,
    )
    assert view_config("digits", "weak", 16).flip_p == 0.0

    g1, g2 = view_config("imagenet100", "global1", 224), view_config("imagenet100", "global2", 224)
    assert (g1.crop_scale, g1.blur_p, g1.solarize_p) == ((0.14, 1.0), 1.0, 0.0)
    assert (g2.blur_p, g2.solarize_p) == (0.1, 0.2)
    assert (g1.brightness, g1.contrast, g1.saturation, g1.hue) == (0.4, 0.4, 0.2, 0.1)
    local = view_config("imagenet100", "local", 224)
    assert (local.size, local.crop_scale, local.blur_p, local.solarize_p) == (
        96,
        (0.05, 0.14),
        0.5,
        0,
    )
    # Blur off at 64 px or less.
    assert view_config("cifar10", "global1", 32).blur_p == 0.0
    assert view_config("stl10", "global1", 96).blur_p == 1.0
    assert view_config("stl10", "local", 96).blur_p == 0.0
    sizes = {d: view_config(d, "local", 32).size for d in ("cifar10", "tinyimagenet", "stl10")}
    assert sizes == {"cifar10": 14, "tinyimagenet": 28, "stl10": 40}
    digits_local = view_config("digits", "local", 16)
    assert (digits_local.size, digits_local.crop_scale) == (8, (0.2, 0.5))


def test_view_config_official_rows():
    """augment=official: each method's published pipeline (docs/recipes.md §3)."""
    def row(cfg):
        return (cfg.crop_scale, cfg.flip_p, cfg.jitter_p,
                (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue), cfg.grayscale_p,
                cfg.blur_p, cfg.solarize_p, cfg.erase_p)

    jitter4 = (0.4, 0.4, 0.4, 0.1)
    assert row(view_config("cifar10", "simclr", 32)) == (
        (0.08, 1.0), 0.5, 0.8, (0.8, 0.8, 0.8, 0.2), 0.2, 0.5, 0.0, 0.0)
    assert row(view_config("cifar10", "byol1", 32)) == (
        (0.08, 1.0), 0.5, 0.8, (0.4, 0.4, 0.2, 0.1), 0.2, 0.0, 0.0, 0.0)
    assert row(view_config("cifar10", "byol2", 32))[5:] == (0.0, 0.2, 0.0)
    assert row(view_config("imagenet100", "byol1", 224))[5:] == (1.0, 0.0, 0.0)
    assert row(view_config("imagenet100", "byol2", 224))[5:] == (0.1, 0.2, 0.0)
    assert row(view_config("cifar10", "mocov2", 32)) == (
        (0.2, 1.0), 0.5, 0.8, jitter4, 0.2, 0.5, 0.0, 0.0)
    assert row(view_config("cifar10", "mocov2_erase", 32)) == (
        (0.2, 1.0), 0.5, 0.8, jitter4, 0.2, 0.5, 0.0, 1.0)
    erase = view_config("cifar10", "mocov2_erase", 32)
    assert (erase.erase_scale, erase.erase_ratio) == ((0.02, 0.33), (0.3, 3.3))  # torchvision's
    assert row(view_config("cifar100", "cld_basic", 32)) == (
        (0.2, 1.0), 0.5, 1.0, (0.4, 0.4, 0.4, 0.4), 0.2, 0.0, 0.0, 0.0)
    assert view_config("imagenet100", "mocov2", 224).blur_kernel == 23


def _erased_boxes(out: torch.Tensor) -> list[tuple[int, int] | None]:
    """(height, width) of each image's zero rectangle, None where nothing was erased."""
    boxes = []
    for zeros in (out == 0).all(dim=1):
        rows, cols = zeros.any(dim=1).nonzero(), zeros.any(dim=0).nonzero()
        if len(rows) == 0:
            boxes.append(None)
            continue
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(zeros.sum()) == h * w  # one filled rectangle
        boxes.append((h, w))
    return boxes


def test_random_erase_follows_torchvision():
    """RandomErasing(p=1, scale (0.02, 0.33), ratio (0.3, 3.3), value 0), batched: every image
    gets one box of a valid size, and the box areas are distributed as torchvision's."""
    n, size = 1500, 32
    images = torch.rand(n, 3, size, size) + 1.0  # no zero before erasing
    g = torch.Generator().manual_seed(0)
    ours = _erased_boxes(ops.random_erase(images, torch.ones(n, dtype=torch.bool),
                                          (0.02, 0.33), (0.3, 3.3), g))
    assert all(b is not None and b[0] < size and b[1] < size for b in ours)
    torch.manual_seed(0)
    eraser = T1.RandomErasing(p=1.0, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)
    theirs = _erased_boxes(torch.stack([eraser(im) for im in images]))
    ours_area = [h * w / size**2 for h, w in ours]
    theirs_area = [h * w / size**2 for h, w in theirs]  # type: ignore[misc]
    assert ks_2samp(ours_area, theirs_area).pvalue > 0.01
    assert np.mean(ours_area) == pytest.approx(np.mean(theirs_area), rel=0.06)
    ours_ratio = [h / w for h, w in ours]
    assert min(ours_ratio) >= 0.3 / 1.5 and max(ours_ratio) <= 3.3 * 1.5  # ratio after rounding
    # where the mask is False, and where ten tries cannot fit a box, the image stays whole
    kept = ops.random_erase(images[:4], torch.zeros(4, dtype=torch.bool), (0.02, 0.33),
                            (0.3, 3.3), g)
    assert torch.equal(kept, images[:4])
    tiny = torch.ones(3, 1, 2, 2)
    assert torch.equal(ops.random_erase(tiny, torch.ones(3, dtype=torch.bool), (0.9, 1.0),
                                        (1.0, 1.0), g), tiny)


def test_multiview_erases_after_normalisation():
    """CLD's CIFAR-10 views: the erased box is 0 in the normalised output (the channel mean)."""
    cfg = view_config("cifar10", "mocov2_erase", 32)
    aug = V.MultiViewAugment([cfg], mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    (out,) = aug(images, torch.Generator().manual_seed(3))
    boxes = _erased_boxes(out)
    assert sum(b is not None for b in boxes) >= 60  # p 1 (a 32-px image fits a box nearly always)


def test_view_config_unknown_names():
    with pytest.raises(ValueError, match="'svhn'.*cifar10.*imagenet100.*fashion_mnist"):
        view_config("svhn", "shared", 32)
    with pytest.raises(ValueError, match="'strong'.*shared.*weak.*local"):
        view_config("cifar10", "strong", 32)

"""BatchAugment must stay a drop-in for the torchvision PIL training pipeline it replaced.

Each random step is checked against torchvision's own transform, run on the same images: the fraction
of flips, the histogram of crop offsets, the distribution of rotation angles (and the rotation itself,
pixel for pixel), the spread that ColorJitter puts into channel statistics, and the whole pipeline.
The comparisons are statistical, so each one is also run against a deliberately wrong BatchAugment to
show that it would catch a real change. Every generator is seeded, so the outcome is fixed.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from app.augment import AugmentParams, BatchAugment, Normalize
from app.checkpoint import GeneratorStates
from app.config import CIFAR100_MEAN, CIFAR100_STD

normalize = Normalize()  # with the CIFAR-100 mean and std, on the CPU

NEAREST = T.InterpolationMode.NEAREST
OFF = dict(padding=0, hflip=False, rotation=0.0, brightness=0.0, contrast=0.0, saturation=0.0)
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # "normalising" with these leaves [0, 1] values
CHI2_8DOF_P001 = 26.12  # chi-square critical value, 8 degrees of freedom, p = 0.001
CHI2_5DOF_P001 = 20.52


# ---------------------------------------------------------------- helpers


def _augment(seed: int, **options: object) -> BatchAugment:
    return BatchAugment(generator=torch.Generator().manual_seed(seed), **options)


def _only(seed: int, **enabled: object) -> BatchAugment:
    """A BatchAugment with every step off except `enabled`, returning raw [0, 1] values."""
    return _augment(seed, **{**OFF, **RAW, **enabled})


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).numpy()]


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _to_uint8(raw: torch.Tensor) -> torch.Tensor:
    return (raw * 255.0).round().clamp(0, 255).to(torch.uint8)


def _denormalize(out: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    return out * std + mean


def _random_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """Photo-like images: smooth colour fields with a per-image tint, values in 10..245."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    tint = 0.3 + 0.7 * torch.rand(n, 3, 1, 1, generator=g)
    img = F.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1) * tint
    return (img * 235 + 10).round().to(torch.uint8)


def _chi2_uniform(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def _chi2_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample chi-square for histograms of equal total count."""
    keep = (a + b) > 0
    return float(((a - b)[keep] ** 2 / (a + b)[keep]).sum())


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: largest gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def _ks_threshold(n: int, m: int) -> float:
    return 1.95 * math.sqrt((n + m) / (n * m))  # p = 0.001


# ---------------------------------------------------------------- flips


def _flip_fraction_ours(image: torch.Tensor, n: int, seed: int) -> float:
    out = _to_uint8(_only(seed, hflip=True)(image.expand(n, -1, -1, -1).contiguous()))
    mirrored = image.flip(-1)
    is_same = (out == image).flatten(1).all(1)
    is_flip = (out == mirrored).flatten(1).all(1)
    assert bool((is_same ^ is_flip).all()), "outputs must be the image or its mirror, nothing else"
    return float(is_flip.double().mean())


def _flip_fraction_torchvision(image: torch.Tensor, n: int, seed: int) -> float:
    torch.manual_seed(seed)
    flip = T.RandomHorizontalFlip()
    pil = _to_pil(image[None])[0]
    mirrored = image.flip(-1)
    return sum(bool(torch.equal(_from_pil(flip(pil)), mirrored)) for _ in range(n)) / n


def test_flip_fraction_matches_torchvision() -> None:
    n = 4000
    image = (torch.arange(32) * 7).to(torch.uint8).view(1, 1, 32).expand(3, 32, 32).contiguous()  # asymmetric
    ours = _flip_fraction_ours(image, n, seed=1)
    theirs = _flip_fraction_torchvision(image, n, seed=2)
    sd = math.sqrt(0.25 / n)
    assert abs(ours - 0.5) < 4 * sd, ours
    assert abs(theirs - 0.5) < 4 * sd, theirs
    assert abs(ours - theirs) < 4 * math.sqrt(2) * sd, (ours, theirs)


# ---------------------------------------------------------------- crops


def _position_image() -> torch.Tensor:
    """Channel 0 holds 10 + row, channel 1 holds 10 + column, so a crop's offset can be read back."""
    r = torch.arange(32).view(32, 1).expand(32, 32)
    c = torch.arange(32).view(1, 32).expand(32, 32)
    return torch.stack([10 + r, 10 + c, torch.full_like(r, 200)]).to(torch.uint8)


def _read_offsets(out: torch.Tensor) -> torch.Tensor:
    """(n, 2) top/left offsets into the 4-padded image, from the centre pixel of uint8 crops."""
    # Output pixel 16 comes from padded pixel 16 + offset, i.e. original pixel 12 + offset.
    return out[:, :2, 16, 16].long() - (10 + 12)


def _offsets_ours(n: int, seed: int, padding: int = 4) -> torch.Tensor:
    image = _position_image()[None].expand(n, -1, -1, -1).contiguous()
    return _read_offsets(_to_uint8(_only(seed, padding=padding)(image)))


def _offsets_torchvision(n: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    crop = T.RandomCrop(32, padding=4)
    pil = _to_pil(_position_image()[None])[0]
    return _read_offsets(torch.stack([_from_pil(crop(pil)) for _ in range(n)]))


def _offset_histograms(offsets: torch.Tensor) -> list[torch.Tensor]:
    assert int(offsets.min()) >= 0 and int(offsets.max()) <= 8, "offsets outside 0..8"
    return [torch.bincount(offsets[:, axis], minlength=9).double() for axis in (0, 1)]


def _offsets_match(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    if int(ours.min()) < 0 or int(ours.max()) > 8:
        return False
    for mine, ref in zip(_offset_histograms(ours), _offset_histograms(theirs)):
        if _chi2_uniform(mine) > CHI2_8DOF_P001 or _chi2_two_sample(mine, ref) > CHI2_8DOF_P001:
            return False
    return True


def test_crop_offsets_match_torchvision() -> None:
    n = 4500
    theirs = _offsets_torchvision(n, seed=3)
    ours = _offsets_ours(n, seed=4)
    for hist in _offset_histograms(theirs):
        assert _chi2_uniform(hist) < CHI2_8DOF_P001, hist  # torchvision itself is uniform on 0..8
    assert _offsets_match(ours, theirs)
    assert not _offsets_match(_offsets_ours(n, seed=4, padding=3), theirs), "comparison must notice padding=3"


def test_crop_is_a_pure_translation_with_zero_padding() -> None:
    image = _position_image()[None]
    aug = _only(0, padding=4)
    for top, left in [(0, 0), (8, 8), (0, 8), (3, 5)]:
        params = aug.sample(1)
        params = AugmentParams(torch.tensor([[top, left]]), params.flip, params.angle, params.factors, params.order)
        out = _to_uint8(aug.apply(image, params))[0]
        expected = TF.crop(TF.pad(image[0], 4), top, left, 32, 32)
        assert torch.equal(out, expected), (top, left)


# ---------------------------------------------------------------- rotation


def test_rotation_angles_match_torchvision() -> None:
    n = 20000
    ours = _augment(5).sample(n).angle
    torch.manual_seed(6)
    theirs = torch.tensor([T.RandomRotation.get_params([-15.0, 15.0]) for _ in range(n)])
    assert ours.dtype == torch.float32
    assert float(ours.min()) >= -15.0 and float(ours.max()) <= 15.0
    assert float(ours.min()) < -14.9 and float(ours.max()) > 14.9
    se_mean = math.sqrt(75.0 / n)  # uniform on [-15, 15] has variance 15**2 / 3 = 75
    for sample in (ours, theirs):
        assert abs(float(sample.mean())) < 4 * se_mean
        assert abs(float(sample.var()) / 75.0 - 1.0) < 0.03
    assert _ks_distance(ours, theirs) < _ks_threshold(n, n)
    narrower = _augment(5, rotation=13.0).sample(n).angle
    assert _ks_distance(narrower, theirs) > _ks_threshold(n, n), "KS comparison must notice rotation=13"


def _rotate_ours(image: torch.Tensor, angle: float) -> torch.Tensor:
    aug = _only(0, padding=4, rotation=15.0)
    params = aug.sample(1)
    identity_crop = AugmentParams(torch.tensor([[4, 4]]), torch.tensor([False]), torch.tensor([angle]),
                                  params.factors, params.order)
    return _to_uint8(aug.apply(image[None], identity_crop))[0]


@pytest.mark.parametrize("angle", [-15.0, -12.5, -3.0, 0.0, 0.7, 7.3, 10.0, 15.0])
def test_rotation_matches_torchvision_rotate(angle: float) -> None:
    image = _random_images(1, seed=7)[0]
    ours = _rotate_ours(image, angle)
    tensor_ref = TF.rotate(image, angle, interpolation=NEAREST)
    pil_ref = _from_pil(TF.rotate(_to_pil(image[None])[0], angle, interpolation=NEAREST))
    assert (ours == tensor_ref).all(0).float().mean() > 0.99
    assert (ours == pil_ref).all(0).float().mean() > 0.99
    if abs(angle) >= 3.0:  # the opposite direction must not pass
        wrong = TF.rotate(image, -angle, interpolation=NEAREST)
        assert (ours == wrong).all(0).float().mean() < 0.9


def test_crop_flip_rotate_match_torchvision_functional_per_image() -> None:
    images = _random_images(64, seed=8)
    aug = _only(9, padding=4, hflip=True, rotation=15.0)
    params = aug.sample(len(images))
    ours = _to_uint8(aug.apply(images, params))
    agree = 0
    for i, image in enumerate(images):
        top, left = params.offsets[i].tolist()
        ref = TF.crop(TF.pad(image, 4), top, left, 32, 32)
        ref = TF.hflip(ref) if bool(params.flip[i]) else ref
        ref = TF.rotate(ref, float(params.angle[i]), interpolation=NEAREST)
        agree += int((ours[i] == ref).all(0).sum())
    assert agree / (64 * 32 * 32) > 0.999


# ---------------------------------------------------------------- colour jitter


def _jitter_torchvision(images: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    jitter = T.ColorJitter(0.2, 0.2, 0.2)
    out = [_from_pil(jitter(pil)) for pil in _to_pil(images) for _ in range(draws)]
    return torch.stack(out).float().div(255).view(len(images), draws, 3, 32, 32)


def _jitter_ours(images: torch.Tensor, draws: int, seed: int, strength: tuple[float, float, float]) -> torch.Tensor:
    b, c, s = strength
    aug = _only(seed, brightness=b, contrast=c, saturation=s)
    return aug(images.repeat_interleave(draws, 0)).view(len(images), draws, 3, 32, 32)


def _jitter_stats(out: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per channel: average of each per-image feature, and its variance across draws of one image.

    Features: the channel's mean (moved by brightness), its spatial std (contrast) and its mean
    distance from the grey image (saturation). The across-draw variance isolates what jitter adds.
    """
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 1, 3, 1, 1)
    grey = (out * luma).sum(2, keepdim=True)
    features = {
        "mean": out.mean((3, 4)),
        "std": out.std((3, 4)),
        "chroma": (out - grey).abs().mean((3, 4)),
    }
    return {name: (f.mean((0, 1)), f.var(1).mean(0)) for name, f in features.items()}


def _jitter_mismatches(ours: dict, theirs: dict) -> list[str]:
    """Names of statistics that disagree. Means: within 0.01 (PIL rounds to uint8 after every op).
    Across-draw variances: ratio within [0.8, 1.25]; jitter strength s scales them about as s**2."""
    bad = []
    for name, (mean, var) in ours.items():
        ref_mean, ref_var = theirs[name]
        if (mean - ref_mean).abs().max() > 0.01:
            bad.append(f"{name} mean {mean.tolist()} vs {ref_mean.tolist()}")
        ratio = var / ref_var
        if ratio.min() < 0.8 or ratio.max() > 1.25:
            bad.append(f"{name} variance ratio {ratio.tolist()}")
    return bad


@pytest.fixture(scope="module")
def jitter_reference() -> tuple[torch.Tensor, dict]:
    images = _smooth_images(32, seed=10)
    return images, _jitter_stats(_jitter_torchvision(images, draws=64, seed=11))


def test_color_jitter_statistics_match_torchvision(jitter_reference: tuple[torch.Tensor, dict]) -> None:
    images, theirs = jitter_reference
    for seed in (12, 13):
        ours = _jitter_stats(_jitter_ours(images, 64, seed, (0.2, 0.2, 0.2)))
        assert _jitter_mismatches(ours, theirs) == []


@pytest.mark.parametrize(
    "strength",
    [(0.4, 0.4, 0.4), (0.0, 0.0, 0.0), (0.4, 0.2, 0.2), (0.2, 0.4, 0.2), (0.2, 0.2, 0.4),
     (0.0, 0.2, 0.2), (0.2, 0.0, 0.2), (0.2, 0.2, 0.0)],
)
def test_color_jitter_comparison_catches_wrong_strength(
    jitter_reference: tuple[torch.Tensor, dict], strength: tuple[float, float, float]
) -> None:
    images, theirs = jitter_reference
    ours = _jitter_stats(_jitter_ours(images, 64, 12, strength))
    assert _jitter_mismatches(ours, theirs) != []


def test_jitter_factors_and_order_match_torchvision_draws() -> None:
    n = 6000
    params = _augment(14).sample(n)
    torch.manual_seed(15)
    draws = [T.ColorJitter.get_params((0.8, 1.2), (0.8, 1.2), (0.8, 1.2), None) for _ in range(n)]
    theirs_factors = torch.tensor([d[1:4] for d in draws])
    for k in range(3):
        assert float(params.factors[:, k].min()) >= 0.8 and float(params.factors[:, k].max()) <= 1.2
        assert _ks_distance(params.factors[:, k], theirs_factors[:, k]) < _ks_threshold(n, n)
    # torchvision shuffles 4 ops; with hue off, the order of the other three is what matters.
    theirs_order = torch.stack([d[0][d[0] < 3] for d in draws])
    assert bool((params.order.sort(1).values == torch.arange(3)).all()), "each row must be a permutation"

    def histogram(order: torch.Tensor) -> torch.Tensor:
        return torch.bincount(order[:, 0] * 3 + order[:, 1], minlength=9)[[1, 2, 3, 5, 6, 7]].double()

    assert _chi2_uniform(histogram(params.order)) < CHI2_5DOF_P001
    assert _chi2_two_sample(histogram(params.order), histogram(theirs_order)) < CHI2_5DOF_P001


def test_jitter_ops_match_torchvision_functional() -> None:
    """One op at a time, with a fixed factor: ours equals torchvision's tensor implementation."""
    images = _smooth_images(8, seed=16)
    aug = _only(0, brightness=0.2, contrast=0.2, saturation=0.2)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for op_index, op in enumerate(ops):
        for factor in (0.8, 1.17):
            factors = torch.ones(len(images), 3)
            factors[:, op_index] = factor
            order = torch.tensor([op_index] + [k for k in range(3) if k != op_index]).expand(len(images), 3)
            params = AugmentParams(torch.zeros(len(images), 2, dtype=torch.long),
                                   torch.zeros(len(images), dtype=torch.bool),
                                   torch.zeros(len(images)), factors, order)
            ours = aug.apply(images, params)
            ref = op(images.float() / 255, factor)
            assert (ours - ref).abs().max() < 2e-3, (op.__name__, factor)


# ---------------------------------------------------------------- whole pipeline


def _pipeline_stats(out: torch.Tensor) -> dict[str, torch.Tensor]:
    raw = _denormalize(out)
    return {
        "mean": out.mean((0, 2, 3)),
        "var": out.var((0, 2, 3)),
        "black": (raw < 0.5 / 255).all(1).float().mean(),  # fill from crop padding and rotation
    }


def _pipeline_matches(ours: dict, theirs: dict) -> bool:
    return (
        float((ours["mean"] - theirs["mean"]).abs().max()) < 0.05
        and float((ours["var"] / theirs["var"] - 1).abs().max()) < 0.06
        and abs(float(ours["black"] / theirs["black"]) - 1) < 0.12
    )


def test_whole_pipeline_matches_torchvision_compose() -> None:
    images = _smooth_images(32, seed=17)
    draws = 64
    torch.manual_seed(18)
    reference = T.Compose([
        T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.RandomRotation(15),
        T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD),
    ])
    theirs = _pipeline_stats(torch.stack([reference(p) for p in _to_pil(images) for _ in range(draws)]))
    batch = images.repeat_interleave(draws, 0)
    assert _pipeline_matches(_pipeline_stats(_augment(19)(batch)), theirs)
    assert not _pipeline_matches(_pipeline_stats(_augment(19, padding=0)(batch)), theirs)
    assert not _pipeline_matches(_pipeline_stats(_augment(19, rotation=0.0)(batch)), theirs)


# ---------------------------------------------------------------- cutout

CHI2_31DOF_P001 = 61.10


def _cutout_reference_box(cy: int, cx: int, side: int, size: int = 32) -> tuple[int, int, int, int]:
    """DeVries & Taylor 2017 (and util/cutout.py): a side x side square about (cy, cx), clipped to the image."""
    top, left = cy - side // 2, cx - side // 2
    return max(0, top), min(size, top + side), max(0, left), min(size, left + side)


def _cutout_reference_areas(n: int, side: int, seed: int) -> torch.Tensor:
    """Zeroed pixels per image, one image at a time: the centre uniform over the image's 32 x 32 pixels."""
    g = torch.Generator().manual_seed(seed)
    areas = []
    for _ in range(n):
        cy, cx = (int(v) for v in torch.randint(0, 32, (2,), generator=g))
        y1, y2, x1, x2 = _cutout_reference_box(cy, cx, side)
        areas.append((y2 - y1) * (x2 - x1))
    return torch.tensor(areas)


def _cutout_ours(n: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 32, 32) bool: where our Cutout zeroed a white image (everything else off); the centres drawn."""
    aug = _only(seed, cutout=side)
    params = aug.sample(n)
    out = aug.apply(torch.full((n, 3, 32, 32), 255, dtype=torch.uint8), params)
    zeroed = out == 0
    assert bool((zeroed == zeroed[:, :1]).all()) and bool((zeroed | (out == 1)).all()), "all channels, nothing else"
    return zeroed[:, 0], params.cutout


def test_cutout_zeroes_the_reference_square_about_a_uniform_centre() -> None:
    n, side = 3000, 8
    zeroed, centres = _cutout_ours(n, side, seed=40)
    for axis in (0, 1):  # the centre uniform over every row and column, borders included
        assert int(centres[:, axis].min()) == 0 and int(centres[:, axis].max()) == 31
        assert _chi2_uniform(torch.bincount(centres[:, axis], minlength=32).double()) < CHI2_31DOF_P001
    for i in range(0, n, 7):  # each image's square is the reference's square about its centre
        y1, y2, x1, x2 = _cutout_reference_box(int(centres[i, 0]), int(centres[i, 1]), side)
        expected = torch.zeros(32, 32, dtype=torch.bool)
        expected[y1:y2, x1:x2] = True
        assert torch.equal(zeroed[i], expected), i


@pytest.mark.parametrize("side", [8, 16, 7])
def test_cutout_zeroed_areas_match_the_per_image_reference(side: int) -> None:
    n = 2000
    ours = _cutout_ours(n, side, seed=41)[0].flatten(1).sum(1)
    theirs = _cutout_reference_areas(n, side, seed=42)
    assert int(ours.max()) == side * side and abs(float(ours.float().mean() / theirs.float().mean()) - 1) < 0.03
    assert _ks_distance(ours, theirs) < _ks_threshold(n, n)
    wrong = _cutout_reference_areas(n, side - 1, seed=42)  # a square one pixel smaller must not pass
    assert _ks_distance(ours, wrong) > _ks_threshold(n, n)


def test_cutout_off_draws_nothing_more_and_the_whole_image_is_kept() -> None:
    images = _random_images(8, seed=43)
    plain, off = _augment(44), _augment(44, cutout=0)
    assert torch.equal(plain(images), off(images))
    assert torch.equal(plain.generator.get_state(), off.generator.get_state()) and off.sample(8).cutout is None
    on = _augment(44, cutout=32)
    assert float(on(images).abs().max()) > 0  # a centred 32-pixel square leaves at least a quarter of the image


# ---------------------------------------------------------------- determinism and state


def test_same_seed_same_output_different_seed_different_output() -> None:
    images = _random_images(16, seed=20)
    assert torch.equal(_augment(21)(images), _augment(21)(images))
    assert not torch.equal(_augment(21)(images), _augment(22)(images))


def test_global_rng_is_neither_used_nor_disturbed() -> None:
    images = _random_images(16, seed=23)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = _augment(24)(images)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(12345)
    assert torch.equal(_augment(24)(images), first)


def test_the_checkpointed_generator_state_reproduces_the_next_batch() -> None:
    """What a resume relies on: the augmentation generator's state, saved in a checkpoint as a training
    checkpoint holds it (app/checkpoint.py GeneratorStates), makes a fresh BatchAugment draw the next
    batch exactly as the first would have."""
    images = _random_images(16, seed=25)
    aug = _augment(26)
    aug(images)
    buffer = io.BytesIO()
    torch.save(GeneratorStates(aug.generator).state_dict(), buffer)
    expected = aug(images)
    restored = _augment(999)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["generators"].dtype == torch.uint8 and state["generators"].device.type == "cpu"
    GeneratorStates(restored.generator).load_state_dict(state)
    assert torch.equal(restored(images), expected)


# ---------------------------------------------------------------- interface


def test_sample_shapes_dtypes_and_ranges() -> None:
    params = _augment(27).sample(500)
    assert params.offsets.shape == (500, 2) and params.offsets.dtype == torch.int64
    assert int(params.offsets.min()) == 0 and int(params.offsets.max()) == 8
    assert params.flip.shape == (500,) and params.flip.dtype == torch.bool
    assert params.angle.shape == (500,) and params.angle.dtype == torch.float32
    assert params.factors.shape == (500, 3) and params.factors.dtype == torch.float32
    assert params.order.shape == (500, 3) and params.order.dtype == torch.int64


def test_output_dtype_shape_and_memory_format() -> None:
    images = _random_images(8, seed=28)
    out = _augment(29)(images)
    assert out.dtype == torch.float32 and out.shape == images.shape and out.is_contiguous()
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert torch.equal(_augment(29)(channels_last), out)


def test_normalize_centres_the_cifar_mean_colour() -> None:
    colour = torch.tensor([round(m * 255) for m in CIFAR100_MEAN], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize(colour.expand(4, 3, 32, 32).contiguous())
    assert out.dtype == torch.float32 and out.shape == (4, 3, 32, 32)
    assert float(out.abs().max()) < 0.01
    white = normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    expected = torch.tensor([(1 - m) / s for m, s in zip(CIFAR100_MEAN, CIFAR100_STD)])
    assert torch.allclose(white[0, :, 0, 0], expected, atol=1e-5)


def test_everything_off_is_plain_normalisation() -> None:
    images = _random_images(8, seed=30)
    assert torch.allclose(_augment(31, **OFF)(images), normalize(images), atol=1e-6)


def test_rejects_non_uint8_images() -> None:
    with pytest.raises(ValueError):
        _augment(32)(torch.rand(2, 3, 32, 32))


@pytest.mark.gpu
def test_cuda_matches_cpu_for_the_same_parameters() -> None:
    images = _random_images(32, seed=33)
    cuda_aug = BatchAugment(generator=torch.Generator(device="cuda").manual_seed(34))
    params = cuda_aug.sample(len(images))
    assert params.offsets.device.type == "cuda"
    on_cuda = cuda_aug.apply(images.cuda(), params).cpu()
    cpu_params = AugmentParams(*(getattr(params, f).cpu() for f in ("offsets", "flip", "angle", "factors", "order")))
    on_cpu = _augment(0).apply(images, cpu_params)
    assert (on_cuda - on_cpu).abs().max() < 1e-3
    again = BatchAugment(generator=torch.Generator(device="cuda").manual_seed(34))(images.cuda())
    assert torch.equal(again, cuda_aug.apply(images.cuda(), params))

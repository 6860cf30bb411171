"""Augmentation presets, custom albumentations lists from YAML, errors, and per-worker seeding."""
from __future__ import annotations

import random
from typing import List

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from mlearn.data.images.transforms import (
    LowResolution,
    ZeroPadRandomCrop,
    build_transform,
    list_augmentations,
    normalize_images,
    to_normalized_tensor,
)


def face(size: int = 112, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("preset", ["standard", "eval", "low_quality"])
def test_presets_shape_dtype_range(preset: str) -> None:
    transform = build_transform(preset, image_size=112)
    for seed in range(20):
        out = transform(face(seed=seed))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 112, 112)
        assert out.min() >= -1.0 and out.max() <= 1.0 and torch.isfinite(out).all()


def test_eval_is_exact_normalisation_and_resizes() -> None:
    image = face()
    expected = (torch.from_numpy(image).permute(2, 0, 1).double() - 127.5) / 127.5
    out = build_transform("eval")(image)
    assert torch.allclose(out.double(), expected, atol=1e-6) and out.is_contiguous()
    assert build_transform("eval", image_size=112)(face(size=128)).shape == (3, 112, 112)
    assert to_normalized_tensor(np.full((2, 2, 3), 255, np.uint8)).eq(1.0).all()


def test_standard_flips_about_half_the_time() -> None:
    image = face()
    plain = to_normalized_tensor(image)
    flipped = torch.flip(plain, dims=[2])
    transform = build_transform("standard")
    outs = [transform(image) for _ in range(200)]
    n_flipped = sum(torch.equal(o, flipped) for o in outs)
    assert all(torch.equal(o, flipped) or torch.equal(o, plain) for o in outs)
    assert 60 < n_flipped < 140


def test_low_quality_components() -> None:
    image = np.full((112, 112, 3), 200, np.uint8)
    crop = ZeroPadRandomCrop(p=1.0)
    for _ in range(20):
        out = crop(image=image)["image"]
        kept = (out == 200).all(axis=2)
        rows, cols = np.where(kept)
        # the kept part is one axis-aligned box in place, the rest is black
        assert kept[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert (out[~kept] == 0).all() and kept.mean() >= 0.15
    low = LowResolution(p=1.0)
    textured = face()
    outs = [low(image=textured)["image"] for _ in range(10)]
    assert all(o.shape == textured.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, textured) for o in outs)
    assert {"low_quality", "adaface", "standard", "eval"} <= set(list_augmentations())


def test_custom_list_from_yaml() -> None:
    spec = yaml.safe_load("""
    - {name: HorizontalFlip, p: 0.5}
    - {name: GaussianBlur, blur_limit: [3, 5], p: 1.0}
    - name: OneOf
      p: 1.0
      transforms: [{name: LowResolution, p: 1.0}, {name: ToGray, p: 1.0}]
    """)
    transform = build_transform(spec, image_size=64)
    out = transform(face(size=64))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32 and out.abs().max() <= 1.0
    assert [type(t).__name__ for t in transform.augmentations] == ["HorizontalFlip", "GaussianBlur", "OneOf"]


def test_custom_list_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown augmentation 'GaussianBlurr'.*albumentations.ai"):
        build_transform([{"name": "GaussianBlurr"}])
    with pytest.raises(TypeError, match=r"'HorizontalFlip' got unknown argument\(s\) \['prob'\]"):
        build_transform([{"name": "HorizontalFlip", "prob": 0.5}])
    with pytest.raises(ValueError, match="appended automatically"):
        build_transform([{"name": "Normalize"}])
    with pytest.raises(ValueError, match="expected an augmentation mapping"):
        build_transform([{"p": 0.5}])
    with pytest.raises(KeyError, match="unknown augmentation preset 'strong'"):
        build_transform("strong")
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        build_transform("eval")(np.zeros((112, 112), np.uint8))


class _SameImage(Dataset):
    def __init__(self) -> None:
        self.image, self.transform = face(size=16), build_transform("standard", image_size=16)

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.image)


def test_workers_draw_different_augmentations() -> None:
    """Forked workers inherit one generator state; the transform re-seeds per process."""
    dataset = _SameImage()
    dataset[0]  # seed the parent's pipeline before forking
    plain = to_normalized_tensor(dataset.image)
    flips: List[bool] = [not torch.equal(batch[0], plain)
                         for batch in DataLoader(dataset, batch_size=1, num_workers=2)]
    worker0, worker1 = flips[0::2], flips[1::2]
    assert worker0 != worker1


@pytest.mark.parametrize("preset", ["standard", "eval", "low_quality"])
def test_uint8_output_normalised_later_matches_float(preset: str) -> None:
    image = face(size=40)
    torch.manual_seed(3)
    as_float = build_transform(preset, image_size=40)(image)
    torch.manual_seed(3)
    as_uint8 = build_transform(preset, image_size=40, output="uint8")(image)
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == (40, 40, 3) and as_uint8.is_contiguous()
    batch = torch.stack([as_uint8, as_uint8])  # uint8 batches are channels-last, as decoded
    normalised = normalize_images(batch)
    assert normalised.shape == (2, 3, 40, 40) and normalised.is_contiguous()
    assert torch.allclose(normalised[1], as_float, atol=1e-6)
    assert normalize_images(as_float) is as_float
    with pytest.raises(ValueError, match="channels-last"):
        normalize_images(torch.zeros(2, 3, 40, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="output must be one of"):
        build_transform("eval", output="half")


def test_uint8_fill_batch_then_normalize_images_equals_the_float_transform() -> None:
    """fill_batch writes the uint8 images flipped as drawn (None entries skipped); normalize_images on
    the device then gives the same floats as the float transform."""
    images = [face(size=24, seed=s) for s in range(6)]
    as_uint8, as_float = build_transform("standard", 24, output="uint8"), build_transform("standard", 24)
    for transform in (as_uint8, as_float):
        transform.set_random_state(np.random.default_rng(1), random.Random(1))
    out = np.empty((6, 24, 24, 3), np.uint8)
    assert as_uint8.fill_batch(images[:2] + [None] + images[3:], out) == [0, 1, 3, 4, 5]
    kept = images[:2] + images[3:]
    flipped = [not np.array_equal(out[k], image) for k, image in enumerate(kept)]
    assert 0 < sum(flipped) < 5
    assert all(np.array_equal(out[k], image[:, ::-1]) for k, image in enumerate(kept) if flipped[k])
    expected = torch.stack([as_float(image) for image in kept])
    torch.testing.assert_close(normalize_images(torch.from_numpy(out[:5])), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("horizontal_last", [False, True])  # True: the flip is fused into the output copy
@pytest.mark.parametrize("output", ["uint8", "float"])
def test_pipeline_transforms_draw_independently(horizontal_last: bool, output: str):
    """Two flips at p=0.5 in one pipeline: each applied about half the time, independently (albumentations'
    set_random_seed would give both the same seed, so they would be applied both or neither)."""
    import albumentations as A

    from mlearn.data.images.transforms import ImageTransform

    image = np.zeros((8, 8, 3), np.uint8)
    image[0, 0] = 255  # the marker's corner tells which flips were applied
    flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    transform = ImageTransform(flips[::-1] if horizontal_last else flips, image_size=8, output=output)
    assert (transform.flip_p == 0.5) == horizontal_last
    corners = {(0, 0): 0, (0, 7): 0, (7, 0): 0, (7, 7): 0}
    for _ in range(400):
        out = transform(image).numpy()
        out = out[..., 0] if output == "uint8" else out[0] * 127.5 + 127.5
        out = np.rint(out)
        corners[tuple(int(v) for v in np.argwhere(out == 255)[0])] += 1
    for count in corners.values():  # none, h only, v only, both: 100 each expected
        assert 60 < count < 140, corners

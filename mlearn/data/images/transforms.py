"""Image augmentation with albumentations, chosen by name (a preset) or as a YAML list.

Every transform built here maps a uint8 [H, W, 3] RGB image to a float32 tensor [3, S, S]
normalised as ``(x - 127.5) / 127.5`` (range [-1, 1]), or with ``output="uint8"`` to the uint8
[S, S, 3] image that :func:`normalize_images` normalises later on the device; images whose size
differs from ``image_size`` are resized first. Presets:

- ``standard``: horizontal flip (p=0.5), as arcface_torch.
- ``eval``: no augmentation.
- ``low_quality`` (alias ``adaface``): AdaFace's augmentations, each with p=0.2, in AdaFace's order:
  a random-resized-crop box kept in place on a zero canvas, low-resolution down/up-sampling by a
  factor in [0.2, 1] with random OpenCV interpolations, photometric jitter (brightness, contrast,
  saturation 0.5); then horizontal flip (p=0.5).

A custom list names albumentations classes (or this module's ``ZeroPadRandomCrop`` and
``LowResolution``) with their arguments, e.g. from YAML::

    augmentation:
      - {name: HorizontalFlip, p: 0.5}
      - {name: GaussianBlur, blur_limit: [3, 5], p: 0.1}
      - {name: OneOf, transforms: [{name: MotionBlur}, {name: MedianBlur}], p: 0.2}
"""
from __future__ import annotations

import math
import os
import random
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import albumentations as A
import cv2
import numpy as np
import torch

from mlearn.registry import Registry, check_kwargs

AugmentationSpec = Union[str, Sequence[Mapping[str, Any]]]
ALBUMENTATIONS_DOCS = "https://albumentations.ai/docs/api-reference/"
_INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)
_APPENDED = {"Normalize", "ToTensorV2", "ToFloat"}

PRESETS: Registry[List[Any]] = Registry("augmentation preset")


def _rng(transform: Any) -> Any:
    """The transform's generator (albumentations >= 2 seeds one per Compose), else numpy's global one."""
    return getattr(transform, "random_generator", None) or np.random


class ZeroPadRandomCrop(A.ImageOnlyTransform):
    """AdaFace's crop augmentation: draw a RandomResizedCrop box (area ``scale``, aspect ``ratio``)
    and keep only that box, in place, on a black canvas of the input size."""

    def __init__(self, scale: Tuple[float, float] = (0.2, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                 p: float = 0.5) -> None:
        super().__init__(p=p)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)

    def box(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """``(top, left, h, w)`` drawn as torchvision's ``RandomResizedCrop.get_params``."""
        rng = _rng(self)
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.uniform(0, height - h + 1)) if height > h else 0
                left = int(rng.uniform(0, width - w + 1)) if width > w else 0
                return min(top, height - h), min(left, width - w), h, w
        in_ratio = width / height  # fallback: the whole image, clamped to the ratio range
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        top, left, h, w = self.box(img.shape[0], img.shape[1])
        out = np.zeros_like(img)
        out[top:top + h, left:left + w] = img[top:top + h, left:left + w]
        return out

    def get_transform_init_args_names(self) -> Tuple[str, ...]:
        return ("scale", "ratio")


class LowResolution(A.ImageOnlyTransform):
    """AdaFace's low-resolution augmentation: resize to a square of side ``ratio * H`` (ratio uniform
    in ``scale``) and back to the input size, each way with a random OpenCV interpolation."""

    def __init__(self, scale: Tuple[float, float] = (0.2, 1.0), p: float = 0.5) -> None:
        super().__init__(p=p)
        self.scale = tuple(scale)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        rng = _rng(self)
        side = max(1, int(rng.uniform(*self.scale) * img.shape[0]))
        down = int(_INTERPOLATIONS[int(rng.uniform(0, len(_INTERPOLATIONS)))])
        up = int(_INTERPOLATIONS[int(rng.uniform(0, len(_INTERPOLATIONS)))])
        small = cv2.resize(img, (side, side), interpolation=down)
        return cv2.resize(small, (img.shape[1], img.shape[0]), interpolation=up)

    def get_transform_init_args_names(self) -> Tuple[str, ...]:
        return ("scale",)


_EXTRA_TRANSFORMS: Dict[str, Any] = {"ZeroPadRandomCrop": ZeroPadRandomCrop, "LowResolution": LowResolution}


@PRESETS.register("standard")
def standard_preset() -> List[Any]:
    """Horizontal flip (p=0.5)."""
    return [A.HorizontalFlip(p=0.5)]


@PRESETS.register("eval", "none")
def eval_preset() -> List[Any]:
    """No augmentation."""
    return []


@PRESETS.register("low_quality", "adaface")
def low_quality_preset(crop_p: float = 0.2, low_res_p: float = 0.2, photometric_p: float = 0.2) -> List[Any]:
    """AdaFace: zero-padded crop, low resolution, photometric jitter (each p=0.2), then flip (p=0.5)."""
    return [
        ZeroPadRandomCrop(scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), p=crop_p),
        LowResolution(scale=(0.2, 1.0), p=low_res_p),
        A.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.0, p=photometric_p),
        A.HorizontalFlip(p=0.5),
    ]


def normalize_into(image: np.ndarray, out: np.ndarray, flip: bool = False) -> None:
    """uint8 (or float in [0, 255]) [H, W, 3] -> ``out`` float32 [3, H, W] as ``(x - 127.5) / 127.5``,
    mirrored left-right when ``flip``."""
    out[...] = (image[:, ::-1] if flip else image).transpose(2, 0, 1)
    out -= 127.5
    out *= 1 / 127.5


def to_normalized_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (or float in [0, 255]) [H, W, 3] -> float32 tensor [3, H, W] as ``(x - 127.5) / 127.5``."""
    chw = np.empty((image.shape[2], image.shape[0], image.shape[1]), dtype=np.float32)
    normalize_into(image, chw)
    return torch.from_numpy(chw)


def copy_uint8_into(image: np.ndarray, out: np.ndarray, flip: bool = False) -> None:
    """[H, W, 3] image -> ``out`` uint8 [H, W, 3] (float input clipped to [0, 255]); mirrored if ``flip``."""
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if flip:
        cv2.flip(image, 1, out)  # writes into out: the mirror and the copy in one pass
    else:
        out[...] = image


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] (channels last, as decoded) -> float32 [..., 3, H, W] ``(x - 127.5) / 127.5``;
    float input is returned unchanged.

    The device-side half of ``output="uint8"`` transforms: batches travel from the DataLoader workers
    as decoded uint8 (4x less memory traffic, no per-image transpose on the CPU) and are normalised
    and made channels-first on the training device
    (:meth:`mlearn.data.images.datamodule.FaceDataModule.on_after_batch_transfer`).
    """
    if images.dtype != torch.uint8:
        return images
    if images.dim() < 3 or images.shape[-1] != 3:
        raise ValueError(f"uint8 images must be channels-last [..., H, W, 3], got {tuple(images.shape)}")
    channels_first = images.movedim(-1, -3)
    out = torch.empty(channels_first.shape, dtype=torch.float32, device=images.device)
    return out.copy_(channels_first).sub_(127.5).div_(127.5)


OUTPUTS = ("float", "uint8")


class ImageTransform:
    """Resize (when needed) -> albumentations augmentations -> tensor.

    ``output="float"``: float32 [3, S, S] normalised to [-1, 1]. ``output="uint8"``: uint8 [S, S, 3]
    (channels last, as decoded), to be normalised on the device with :func:`normalize_images`
    (cheaper to batch and to ship between processes; see ``evaluation/BENCHMARKS.md``).
    :meth:`fill` / :meth:`fill_batch` write the results into a preallocated batch instead
    (:meth:`mlearn.data.images.base.IdentityImageDataset.load_batch`); ``sample_shape``/``sample_dtype``
    describe one sample of it.

    A trailing ``HorizontalFlip`` (the whole ``standard`` preset) is not run through albumentations:
    it is drawn with the same probability from the pipeline's Python generator and applied while
    writing the output (``cv2.flip`` into the batch), which saves a copy of the image and
    albumentations' per-call overhead (10-19% of the loader's time, ``evaluation/BENCHMARKS.md``).

    The augmentations draw from one numpy and one Python generator (:meth:`set_random_state`), seeded
    once in every process from ``torch.initial_seed()`` unless set explicitly: DataLoader workers are
    forked with identical generator states, and without this every worker would draw the same
    augmentations.
    """

    def __init__(self, augmentations: Sequence[Any] = (), image_size: Union[int, Tuple[int, int]] = 112,
                 output: str = "float") -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        scalar = isinstance(image_size, (int, np.integer))
        self.size = (image_size, image_size) if scalar else tuple(image_size)
        if len(self.size) != 2 or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                                          and x >= 1 for x in self.size):
            raise ValueError(f"image_size: expected a positive number of pixels (or a (height, width) pair), "
                             f"got {image_size!r}")
        self.augmentations = list(augmentations)
        rest = self.augmentations
        self.flip_p = 0.0
        if rest and type(rest[-1]) is A.HorizontalFlip:
            rest, self.flip_p = rest[:-1], float(rest[-1].p)
        self.pipeline = A.Compose(rest) if rest else None
        self.draws_randomly = self.pipeline is not None or self.flip_p > 0
        self.output = output
        if output == "float":
            self.sample_shape, self.sample_dtype, self._write = (3, *self.size), torch.float32, normalize_into
        else:
            self.sample_shape, self.sample_dtype, self._write = (*self.size, 3), torch.uint8, copy_uint8_into
        self.random_generator: Any = None
        self._python_random: Any = None
        self._seeded_pid = -1  # the process that seeded the generators; None: given by set_random_state

    def _ensure_seeded(self) -> None:
        # generators given explicitly (the per-sample streams of EpochSeededDataset) are kept in every
        # process; the ones seeded here are re-seeded in each new one (forked workers would draw alike)
        if self._seeded_pid is not None and self._seeded_pid != os.getpid():
            seed = torch.initial_seed() % 2**32
            self._use(np.random.default_rng(seed), random.Random(seed))
            self._seeded_pid = os.getpid()

    def _draw_flip(self) -> bool:
        return self.flip_p > 0 and self._python_random.random() < self.flip_p

    def _resized(self, image: np.ndarray) -> np.ndarray:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a [H, W, 3] RGB numpy image, got "
                             f"{type(image).__name__} {getattr(image, 'shape', '')}")
        if image.shape[:2] == self.size:
            return image
        shrink = image.shape[0] > self.size[0]
        return cv2.resize(image, (self.size[1], self.size[0]),
                          interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def _augment(self, image: np.ndarray) -> Tuple[np.ndarray, bool]:
        """Resize and run the pipeline; returns the image and whether to mirror it."""
        image = self._resized(image)
        if not self.draws_randomly:
            return image, False
        self._ensure_seeded()
        if self.pipeline is not None:
            image = self.pipeline(image=image)["image"]
        return image, self._draw_flip()

    def augment(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] RGB -> resized and augmented [S, S, 3] (before normalisation)."""
        image, flip = self._augment(image)
        return np.ascontiguousarray(image[:, ::-1]) if flip else image

    def fill(self, image: np.ndarray, out: np.ndarray) -> None:
        """Transform ``image`` into ``out``, a numpy array of ``sample_shape`` and ``sample_dtype``."""
        image, flip = self._augment(image)
        self._write(image, out, flip)

    def fill_batch(self, images: Iterable[Optional[np.ndarray]], out: np.ndarray,
                   streams: Optional[Any] = None) -> List[int]:
        """:meth:`fill` of the images, taken one at a time (e.g. decoded on demand), into ``out[0]``,
        ``out[1]``, ...; ``None`` entries are skipped. Returns the positions in ``images`` written.

        ``streams`` (:class:`mlearn.data.seeding.SampleStreams`, whose generators this transform draws
        from, as :class:`~mlearn.data.order.EpochSeededDataset` sets it up): image j draws from
        stream j. A transform that draws only the flip takes it from each stream's first ``random()``,
        computed for the whole batch up front, with the same results (4-6% of the loader's time,
        ``evaluation/BENCHMARKS.md``).
        """
        flips: Optional[List[bool]] = None
        if self.pipeline is None and self.flip_p > 0 and streams is not None:
            flips = [draw < self.flip_p for draw in streams.first_randoms()]
        written: List[int] = []
        for j, image in enumerate(images):
            if image is None:
                continue
            if flips is not None:
                image, flip = self._resized(image), flips[j]
            else:
                if streams is not None:
                    streams.select(j)
                image, flip = self._augment(image)
            self._write(image, out[len(written)], flip)
            written.append(j)
        return written

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        out = torch.empty(self.sample_shape, dtype=self.sample_dtype)
        self.fill(image, out.numpy())
        return out

    def set_random_state(self, numpy_generator: np.random.Generator, python_random: random.Random) -> None:
        """Make every augmentation draw from these two shared generators.

        Not albumentations' ``set_random_seed``: that gives each transform its own generator from the
        same seed, so their first draws coincide (two flips applied both or neither, every time).
        """
        self._use(numpy_generator, python_random)
        self._seeded_pid = None

    def _use(self, numpy_generator: np.random.Generator, python_random: random.Random) -> None:
        if self.pipeline is not None:
            self.pipeline.set_random_state(numpy_generator, python_random)
        self.random_generator, self._python_random = numpy_generator, python_random

    def __repr__(self) -> str:
        names = ", ".join(type(t).__name__ for t in self.augmentations) or "none"
        return f"ImageTransform(size={self.size}, augmentations=[{names}], output={self.output})"


def build_albumentation(spec: Mapping[str, Any]) -> Any:
    """Build one albumentations transform from ``{name: ClassName, **arguments}``.

    A ``transforms`` argument holding a list of such mappings (``OneOf``, ``SomeOf``, ``Sequential``)
    is built recursively. Unknown names raise ``ValueError``; unknown arguments ``TypeError``.
    """
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"expected an augmentation mapping {{name: ClassName, ...}}, got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    name = str(spec["name"])
    if name in _APPENDED:
        raise ValueError(f"augmentation '{name}': normalisation and tensor conversion are appended "
                         f"automatically; remove it from the list")
    cls = _EXTRA_TRANSFORMS.get(name) or getattr(A, name, None)
    if not isinstance(cls, type) or not issubclass(cls, (A.BasicTransform, A.BaseCompose)):
        raise ValueError(f"unknown augmentation '{name}': not an albumentations transform (names are "
                         f"case-sensitive class names; see {ALBUMENTATIONS_DOCS}) nor one of "
                         f"{sorted(_EXTRA_TRANSFORMS)}")
    if isinstance(kwargs.get("transforms"), (list, tuple)):
        kwargs["transforms"] = [build_albumentation(t) for t in kwargs["transforms"]]
    check_kwargs(cls, kwargs, f"augmentation '{name}'")
    return cls(**kwargs)


def build_transform(spec: AugmentationSpec = "standard", image_size: Union[int, Tuple[int, int]] = 112,
                    output: str = "float") -> Callable[[np.ndarray], torch.Tensor]:
    """Build the image transform: a preset name (see :func:`list_augmentations`) or a list of
    ``{name: AlbumentationsClass, **arguments}`` mappings. Maps uint8 [H, W, 3] RGB to float32
    [3, S, S] in [-1, 1]; normalisation and tensor conversion are always appended. With
    ``output="uint8"`` it returns uint8 [S, S, 3] and :func:`normalize_images` normalises later."""
    if isinstance(spec, str):
        augmentations = PRESETS.build(spec)
    elif isinstance(spec, Sequence):
        augmentations = [build_albumentation(item) for item in spec]
    else:
        raise TypeError(f"augmentation must be a preset name {PRESETS.names()} or a list of "
                        f"{{name: ..., ...}} mappings, got {type(spec).__name__}")
    return ImageTransform(augmentations, image_size=image_size, output=output)


def list_augmentations() -> List[str]:
    """Names of the augmentation presets."""
    return PRESETS.names()


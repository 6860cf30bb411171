"""A synthetic face-identity corpus with real identity structure and real nuisance variation.

Each identity is a fixed set of facial parameters (face shape, skin tone and blotch texture, eye
spacing/size/iris colour, brows, nose, mouth, hair line and colour, moles). Each image of an
identity re-renders those parameters under per-image nuisances: pose (rotation, scale, shift,
shear), expression (eye opening, mouth curvature), illumination (directional gradient, colour
cast, contrast), background, blur, sensor noise and occluders (bars, boxes). Colours are drawn
from small shared palettes, so identities differ mostly in geometry and texture, not in a
colour a raw-pixel matcher could latch onto.

Layout written by :func:`make_face_dataset`::

    root/train/<identity>/<n>.jpg   training identities (image folder)
    root/val.bin                    verification pairs on DISJOINT identities (insightface .bin)
    root/meta.json                  generation parameters (a mismatch regenerates)
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from mlearn.data.images.bins import write_bin

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
_CANVAS = 224  # render at 2x, then the affine warp samples down to the output size

_SKIN = np.array([[233, 196, 170], [214, 170, 136], [190, 140, 105], [150, 100, 72], [110, 75, 55]], float)
_HAIR = np.array([[30, 25, 20], [80, 55, 35], [150, 110, 60], [200, 170, 110], [120, 120, 120]], float)
_IRIS = np.array([[60, 40, 25], [70, 110, 150], [80, 120, 70], [40, 40, 40]], float)


DETAIL_CELLS = 8  # the identity's mid-frequency skin pattern: a DETAIL_CELLS^2 grid over the face box


def sample_identity(rng: np.random.Generator, detail: float = 0.0) -> Dict[str, Any]:
    """Draw the fixed parameters of one identity (canvas units, 224x224).

    ``detail`` > 0 adds a mid-frequency skin pattern (freckle/pore-like marks: a DETAIL_CELLS x
    DETAIL_CELLS grid of luminance offsets with std ``detail`` grey levels, smoothly interpolated over the
    face, ~9 px per cell at 112 px). Blur, noise and low resolution erase it long before they erase the
    coarse shapes, so identity then depends on image quality. The extra draws come after all others:
    ``detail=0`` (the default corpus) draws exactly what it always did.
    """
    ident = {
        "skin": _SKIN[rng.integers(len(_SKIN))] + rng.normal(0, 6, 3),
        "hair": _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 6, 3),
        "iris": _IRIS[rng.integers(len(_IRIS))],
        "face_w": rng.uniform(62, 80),
        "face_h": rng.uniform(80, 100),
        "jaw": rng.uniform(0.75, 1.0),
        "eye_dx": rng.uniform(20, 32),
        "eye_y": rng.uniform(-18, -4),
        "eye_w": rng.uniform(9, 15),
        "eye_h": rng.uniform(4, 8),
        "brow_dy": rng.uniform(10, 18),
        "brow_tilt": rng.uniform(-6, 6),
        "brow_w": rng.uniform(2, 6),
        "nose_len": rng.uniform(14, 30),
        "nose_w": rng.uniform(6, 16),
        "mouth_y": rng.uniform(28, 46),
        "mouth_w": rng.uniform(14, 30),
        "mouth_curve": rng.uniform(-6, 6),
        "lip": rng.uniform(2, 6),
        "hairline": rng.uniform(-70, -45),
        "hair_wave": rng.uniform(0, 10, 5),
        "moles": rng.uniform(-50, 50, (int(rng.integers(0, 4)), 2)),
        "blotch": rng.normal(0, 14, (4, 4, 3)),
    }
    if detail > 0:
        ident["detail"] = rng.normal(0, detail, (DETAIL_CELLS, DETAIL_CELLS))
    return ident


def render_face(ident: Dict[str, Any], rng: np.random.Generator, size: int = 112,
                clean: bool = False) -> np.ndarray:
    """Render one image of ``ident`` under random nuisances. Returns uint8 [size, size, 3] RGB.

    ``clean``: only the appearance nuisances (pose, expression, illumination, background); no blur,
    sensor noise or occluder, so image quality is left to :mod:`mlearn.data.synthetic.degrade` at a
    known strength.
    """
    background = tuple(int(v) for v in rng.uniform(20, 235, 3))
    canvas = Image.new("RGB", (_CANVAS, _CANVAS), background)
    _draw_face(canvas, ident, rng)
    canvas = _random_affine(canvas, rng, size, background)
    image = np.asarray(canvas, dtype=np.float32)
    image = _illuminate(image, rng)
    if clean:
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)
    out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.6))))
    image = np.asarray(out, dtype=np.float32)
    image += rng.normal(0, rng.uniform(0, 10), image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        _occlude(image, rng)
    return image


def _draw_face(canvas: Image.Image, p: Dict[str, Any], rng: np.random.Generator) -> None:
    draw = ImageDraw.Draw(canvas)
    cx, cy = _CANVAS / 2, _CANVAS / 2 + 6
    hair = tuple(int(v) for v in np.clip(p["hair"], 0, 255))
    skin = np.clip(p["skin"], 0, 255)
    fw, fh = p["face_w"], p["face_h"]
    # hair mass behind the head, then the face (upper ellipse + narrower jaw)
    draw.ellipse([cx - fw - 10, cy - fh - 14, cx + fw + 10, cy + fh * 0.3], fill=hair)
    draw.ellipse([cx - fw - 8, cy - 12, cx - fw + 8, cy + 16], fill=tuple(int(v) for v in skin * 0.92))
    draw.ellipse([cx + fw - 8, cy - 12, cx + fw + 8, cy + 16], fill=tuple(int(v) for v in skin * 0.92))
    draw.ellipse([cx - fw, cy - fh, cx + fw, cy + fh * 0.4], fill=tuple(int(v) for v in skin))
    jaw = fw * p["jaw"]
    draw.ellipse([cx - jaw, cy - fh * 0.5, cx + jaw, cy + fh], fill=tuple(int(v) for v in skin))
    _paint_blotches(canvas, p, cx, cy)
    draw = ImageDraw.Draw(canvas)
    # hair line: a wavy polygon across the forehead
    xs = np.linspace(cx - fw, cx + fw, len(p["hair_wave"]))
    top = [(float(x), float(cy + p["hairline"] + w)) for x, w in zip(xs, p["hair_wave"])]
    draw.polygon([(cx - fw, cy - fh - 14), *top, (cx + fw, cy - fh - 14)], fill=hair)
    openness = rng.uniform(0.35, 1.15)  # expression: blinks and wide eyes
    for side in (-1, 1):
        ex, ey = cx + side * p["eye_dx"], cy + p["eye_y"]
        ew, eh = p["eye_w"], max(p["eye_h"] * openness, 1.0)
        draw.ellipse([ex - ew, ey - eh, ex + ew, ey + eh], fill=(245, 245, 240))
        r = min(eh, ew * 0.5)
        gaze = rng.uniform(-2, 2)
        draw.ellipse([ex + gaze - r, ey - r, ex + gaze + r, ey + r], fill=tuple(int(v) for v in p["iris"]))
        pupil = r / 2.5
        draw.ellipse([ex + gaze - pupil, ey - pupil, ex + gaze + pupil, ey + pupil], fill=(10, 10, 10))
        by = ey - p["brow_dy"]
        tilt = side * p["brow_tilt"]
        draw.line([(ex - ew, by + tilt), (ex + ew, by - tilt)], fill=hair, width=int(p["brow_w"] + 1))
    shade = tuple(int(v) for v in skin * 0.7)
    ny = cy + p["eye_y"] + 6
    tip = ny + p["nose_len"]
    draw.polygon([(cx, ny), (cx - p["nose_w"] / 2, tip), (cx + p["nose_w"] / 2, tip)],
                 fill=tuple(int(v) for v in skin * 0.85), outline=shade)
    my = cy + p["mouth_y"]
    curve = p["mouth_curve"] + rng.uniform(-4, 4)  # expression: smile / frown
    mw = p["mouth_w"]
    lips = [(cx - mw, my), (cx, my + curve), (cx + mw, my), (cx, my + curve + p["lip"])]
    draw.polygon(lips, fill=(150, 60, 60))
    for mx, my_ in p["moles"]:
        draw.ellipse([cx + mx - 2, cy + my_ - 2, cx + mx + 2, cy + my_ + 2], fill=(70, 45, 35))


def _paint_blotches(canvas: Image.Image, p: Dict[str, Any], cx: float, cy: float) -> None:
    """Add the identity's skin texture inside the face region: low-frequency colour blotches and, when the
    identity has one, the mid-frequency luminance pattern."""
    array = np.asarray(canvas, dtype=np.float32).copy()
    box = (int(2 * p["face_w"]), int(2 * p["face_h"]))
    tex = np.asarray(Image.fromarray(((p["blotch"] + 128).clip(0, 255)).astype(np.uint8)).resize(
        box, Image.BICUBIC), dtype=np.float32) - 128
    if "detail" in p:
        tex = tex + _upsample(p["detail"], box)[..., None]
    y0, x0 = int(cy - p["face_h"]), int(cx - p["face_w"])
    region = array[y0:y0 + tex.shape[0], x0:x0 + tex.shape[1]]
    skin_mask = (np.abs(region - p["skin"]).sum(-1, keepdims=True) < 20).astype(np.float32)
    region += tex[: region.shape[0], : region.shape[1]] * skin_mask
    canvas.paste(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)))


def _upsample(grid: np.ndarray, box: Tuple[int, int]) -> np.ndarray:
    """Bicubic upsampling of a float [h, w] grid to ``box`` = (width, height) px, in float32."""
    return np.asarray(Image.fromarray(grid.astype(np.float32), mode="F").resize(box, Image.BICUBIC))


def _random_affine(canvas: Image.Image, rng: np.random.Generator, size: int,
                   fill: Tuple[int, ...]) -> Image.Image:
    """Pose jitter: rotation +-15 deg, scale 0.9-1.1, shift +-6 px, shear +-0.1; also downsamples."""
    angle = math.radians(rng.uniform(-15, 15))
    scale = rng.uniform(0.9, 1.1) * size / _CANVAS
    shear = rng.uniform(-0.1, 0.1)
    tx, ty = rng.uniform(-6, 6, 2)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # inverse map output (x, y) -> canvas coordinates, about the centres
    a, b = cos, -sin + shear / scale
    d, e = sin, cos
    ox, oy = size / 2 + tx, size / 2 + ty
    c = _CANVAS / 2 - a * ox - b * oy
    f = _CANVAS / 2 - d * ox - e * oy
    return canvas.transform((size, size), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR,
                            fillcolor=fill)


def _illuminate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w, _ = image.shape
    direction = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx - w / 2) * math.cos(direction) + (yy - h / 2) * math.sin(direction)) / (w / 2)
    gain = 1.0 + rng.uniform(0.0, 0.5) * ramp
    cast = rng.uniform(0.8, 1.2, 3)
    contrast = rng.uniform(0.7, 1.3)
    mean = image.mean()
    return ((image - mean) * contrast + mean) * gain[..., None] * cast


def _occlude(image: np.ndarray, rng: np.random.Generator) -> None:
    h, w, _ = image.shape
    colour = rng.uniform(0, 255, 3)
    if rng.random() < 0.5:  # sunglasses-like bar across the eyes
        y = int(h * rng.uniform(0.3, 0.45))
        image[y:y + int(h * 0.12), int(w * 0.15):int(w * 0.85)] = colour
    else:
        bw, bh = (rng.uniform(0.15, 0.35, 2) * [w, h]).astype(int)
        x, y = rng.integers(0, w - bw), rng.integers(0, h - bh)
        image[y:y + bh, x:x + bw] = colour


def make_face_dataset(
    root: PathLike,
    num_identities: int = 200,
    images_per_identity: int = 30,
    num_val_identities: int = 100,
    num_val_pairs: int = 1200,
    image_size: int = 112,
    seed: int = 0,
) -> Path:
    """Write (or reuse, if ``root/meta.json`` matches) the synthetic corpus; returns ``root``.

    Validation pairs come in 10 contiguous blocks of half positive, half negative pairs, as LFW's
    ``pairs.txt``; validation identities never occur in ``train/``.
    """
    if num_val_pairs % 20:
        raise ValueError(f"num_val_pairs={num_val_pairs}: expected a multiple of 20 (10 folds, half "
                         "positive)")
    root = Path(root)
    meta = {"version": 1, "num_identities": num_identities, "images_per_identity": images_per_identity,
            "num_val_identities": num_val_identities, "num_val_pairs": num_val_pairs,
            "image_size": image_size, "seed": seed}
    meta_path = root / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return root
    rng = np.random.default_rng(seed)
    identities = [sample_identity(rng) for _ in range(num_identities + num_val_identities)]
    train = root / "train"
    for k in tqdm(range(num_identities), desc="synthetic faces: train", unit="id"):
        folder = train / f"id{k:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(images_per_identity):
            face = render_face(identities[k], rng, image_size)
            Image.fromarray(face).save(folder / f"{n:03d}.jpg", quality=95)
    images, issame = _verification_pairs(identities[num_identities:], num_val_pairs, image_size, rng)
    write_bin(root / "val.bin", images, issame)
    meta_path.write_text(json.dumps(meta, indent=2))
    log.info("synthetic face corpus written to %s", root)
    return root


def _verification_pairs(identities: List[Dict[str, Any]], num_pairs: int, size: int,
                        rng: np.random.Generator) -> Tuple[List[np.ndarray], List[bool]]:
    images: List[np.ndarray] = []
    issame: List[bool] = []
    per_block = num_pairs // 10
    for _ in tqdm(range(10), desc="synthetic faces: val pairs", unit="fold"):
        for same in [True] * (per_block // 2) + [False] * (per_block // 2):
            a = int(rng.integers(len(identities)))
            b = a if same else int((a + rng.integers(1, len(identities))) % len(identities))
            images += [render_face(identities[a], rng, size), render_face(identities[b], rng, size)]
            issame.append(same)
    return images, issame

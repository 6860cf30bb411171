"""Five-point face alignment to the 112x112 ArcFace template (least-squares similarity, Umeyama 1991)."""
from __future__ import annotations

from typing import Tuple

import numpy as np

# (x, y) in a 112x112 crop: left eye, right eye, nose tip, left and right mouth corners (insightface's
# 96x112 template shifted by +8 px in x).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
ARCFACE_SIZE = (112, 112)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2-D similarity (rotation, uniform scale, translation; no reflection) mapping
    ``src`` [K, 2] onto ``dst`` [K, 2] (pixels). Returns the 3x3 homogeneous matrix ``T`` with
    ``dst ~ T @ [x, y, 1]``: the same estimate as scikit-image's ``SimilarityTransform.estimate``.

    >>> src, dst = np.array([[0., 0.], [1., 0.], [0., 1.]]), np.array([[1., 1.], [1., 3.], [-1., 1.]])
    >>> np.round(similarity_transform(src, dst), 6).tolist()
    [[0.0, -2.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"similarity_transform: expected two [K, 2] point sets with K >= 2, "
                         f"got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError(f"similarity_transform: non-finite points {src.tolist()}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError(f"similarity_transform: degenerate source points (all equal): {src.tolist()}")
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    # Force a proper rotation (det = +1): flip the axis of the smallest singular value if needed.
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / src_var)
    matrix = np.eye(3)
    matrix[:2, :2] = scale * rotation
    matrix[:2, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def align_face(image: np.ndarray, landmarks: np.ndarray, template: np.ndarray = ARCFACE_TEMPLATE,
               size: Tuple[int, int] = ARCFACE_SIZE, bgr: bool = True) -> np.ndarray:
    """Warp a face to the template: ``image`` uint8 [H, W, 3] (BGR as read by OpenCV unless
    ``bgr=False``) or [H, W] grey; ``landmarks`` [5, 2] (x, y) pixels in the order of ``template``.
    Returns uint8 RGB [size[1], size[0], 3] (``size`` is (width, height)); outside pixels are 0."""
    import cv2

    points = np.asarray(landmarks, np.float64).reshape(-1, 2)
    if points.shape != np.asarray(template).shape:
        raise ValueError(f"align_face: expected landmarks of shape {np.asarray(template).shape}, "
                         f"got {np.asarray(landmarks).shape}")
    matrix = similarity_transform(points, template)[:2]
    warped = cv2.warpAffine(np.ascontiguousarray(image), matrix, tuple(size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if warped.ndim == 2:
        return np.repeat(warped[:, :, None], 3, axis=2)
    return np.ascontiguousarray(warped[:, :, ::-1]) if bgr else warped

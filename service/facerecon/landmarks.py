"""The 68 iBUG landmarks' one shared fact: their reduction to the reference's 5 alignment points (a leaf module:
numpy only, so detection, alignment and the face model all use this one definition)."""

from __future__ import annotations

import numpy as np

__all__ = ["LM5_FROM_68", "lm68_to_lm5"]

#: 0-based iBUG indices defining the reference's 5 points: eye centres as means of the two corners, nose tip,
#: mouth corners (reference.md section 1): image-left eye, image-right eye, nose tip, image-left and image-right
#: mouth corner.
LM5_FROM_68: tuple[tuple[int, ...], ...] = ((36, 39), (42, 45), (30,), (48,), (54,))


def lm68_to_lm5(lm68: np.ndarray) -> np.ndarray:
    """Reduce 68 iBUG landmarks to the reference's 5 points.

    Args:
        lm68: ``(..., 68, D)`` (D = 2 for photo points, 3 for 3D model points), any frame.

    Returns:
        ``(..., 5, D)`` in the input's dtype and frame: ``mean(36, 39), mean(42, 45), 30, 48, 54``.
    """
    lm68 = np.asarray(lm68)
    if lm68.ndim < 2 or lm68.shape[-2] != 68:
        raise ValueError(f"expected (..., 68, D) landmarks, got {lm68.shape}")
    pts = [lm68[..., list(idx), :].mean(axis=-2) for idx in LM5_FROM_68]
    return np.stack(pts, axis=-2).astype(lm68.dtype, copy=False)

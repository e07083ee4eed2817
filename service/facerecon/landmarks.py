"""The 68 iBUG landmarks' shared facts: their reduction to the reference's 5 alignment points and the reference's
per-landmark loss weights (a leaf module: numpy only, so detection, alignment, the face model, the fit and the
torch-free landmark stage all use these one definitions)."""

from __future__ import annotations

import numpy as np

__all__ = ["LANDMARK_WEIGHTS_68", "LM5_FROM_68", "lm68_to_lm5"]

#: The reference's per-landmark weights of the landmark loss (PT ``landmark_loss``: nose 28-30 and inner mouth 60-67
#: count 20 times), float64; torch's copy is :data:`facerecon.losses.LANDMARK_WEIGHTS`.
LANDMARK_WEIGHTS_68 = np.ones(68, np.float64)
LANDMARK_WEIGHTS_68[[28, 29, 30]] = 20.0
LANDMARK_WEIGHTS_68[60:68] = 20.0
LANDMARK_WEIGHTS_68.flags.writeable = False

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

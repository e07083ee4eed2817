"""Reconstructions run concurrently from threads (no global lock around the networks and the fit with a
thread-safe renderer) give exactly the results they give one after another."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from facerecon.imaging import load_image
from tests.conftest import need_shared

PHOTOS = ("000002.jpg", "000031.jpg", "vd025.png")


def _result(reconstructor, image: np.ndarray, refine: bool) -> tuple[np.ndarray, np.ndarray]:
    rec = reconstructor.reconstruct(image, refine=refine)[0]
    return rec.coefficients.to_vector().detach().numpy().copy(), rec.landmarks_photo.copy()


def test_concurrent_reconstructions_equal_serial_ones(reconstructor) -> None:
    folder = need_shared("data", "deep3d-examples")
    images = [load_image(folder / name) for name in PHOTOS]
    jobs = [(image, refine) for refine in (False, True) for image in images]
    serial = [_result(reconstructor, image, refine) for image, refine in jobs]
    assert reconstructor.renderer.thread_safe, "the default CPU renderer runs without the lock"
    with ThreadPoolExecutor(max_workers=3) as pool:
        concurrent = list(pool.map(lambda job: _result(reconstructor, *job), jobs * 2))
    for k, (coeffs, landmarks) in enumerate(concurrent):
        want_coeffs, want_landmarks = serial[k % len(jobs)]
        np.testing.assert_array_equal(coeffs, want_coeffs)
        np.testing.assert_array_equal(landmarks, want_landmarks)

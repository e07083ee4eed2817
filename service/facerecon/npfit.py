"""The fit's landmark stage without torch: Levenberg-Marquardt on the 68 landmarks, in NumPy, in a few milliseconds.

:func:`refine_landmarks` solves the fit's first-stage objective exactly (:func:`facerecon.objective.landmark_terms`
with the fit's weights, :class:`facerecon.fit.FitConfig`): for each face

    E = w_lm / 68 * sum_n c_n |q_n - l_n|^2  +  w_coef * (w_id |alpha|^2 + w_exp |beta|^2)

over identity ``alpha``, expression ``beta``, the angles and the translation, where ``q_n`` are the projected
landmark vertices (:meth:`facerecon.npdecode.NumpyDecoder.landmarks`), ``l_n`` the detector's 68 points in the crop
and ``c_n`` the reference's per-landmark weights (nose and inner mouth x 20,
:data:`facerecon.landmarks.LANDMARK_WEIGHTS_68`). The torch fit takes 60 Adam steps on it (~75 ms); this solves it
to convergence with a few damped Gauss-Newton steps: the
residuals are linear in ``alpha`` and ``beta`` before the projection, so the Jacobian of those columns is exact
(``d proj / d cam . R . basis``), and so are the translation's and the angles' (``d proj / d cam . dR/dθ .
shape``). Albedo and light are left as they are (the landmarks say nothing about them).

:func:`landmark_stage` is the R-Net path's use of it (mode ``rnet+lm``, ``refine=false``): the same objective with
its own prior (:data:`FAST_PRIOR`), the hidden half of the jaw contour faded out by yaw and the result handed back to
the R-Net towards profile (:data:`HIDDEN_JAW_DEG`, :data:`BLEND_DEG`).

Shapes: ``B`` faces, ``K = K_id + K_exp + 6`` unknowns each; every face is solved on its own (a ``K x K`` system).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from facerecon.coefficients import Coefficients
from facerecon.landmarks import LANDMARK_WEIGHTS_68
from facerecon.npdecode import NumpyDecoder

__all__ = ["FREE", "LandmarkFitResult", "LandmarkPrior", "blend_back", "landmark_stage", "refine_landmarks",
           "turned_weights"]

#: The groups the landmarks determine, in the unknown vector's order.
FREE = ("id", "exp", "angle", "trans")


@dataclass(frozen=True)
class LandmarkPrior:
    """Weights of the objective (module docstring); defaults: the fit's (:class:`facerecon.fit.FitConfig`: the
    reference's landmark weight 1.6e-3 and a coefficient prior of 3e-3 with identity 1, expression 0.8)."""

    landmark: float = 1.6e-3
    coef: float = 3.0e-3
    coef_id: float = 1.0
    coef_exp: float = 0.8
    #: where the coefficient prior pulls: ``"zero"`` (the mean face, the fit's prior), ``"start"`` (the starting
    #: coefficients, e.g. the R-Net's: a prior centred on the network's estimate) or ``"start_exp"`` (identity
    #: towards the mean face, expression towards the starting expression)
    center: str = "zero"


@dataclass(frozen=True)
class LandmarkFitResult:
    """``coefficients`` (NumPy, as given but for id, exp, angle, trans); mean landmark error (crop px) per face
    before and after; ``iterations`` taken per face."""

    coefficients: Coefficients
    error_start: list[float]
    error_end: list[float]
    iterations: list[int]


def refine_landmarks(decoder: NumpyDecoder, coeffs: Coefficients, target: np.ndarray,
                     weights: np.ndarray | None = None, prior: LandmarkPrior | None = None,
                     iterations: int = 8, tol: float = 1e-4, free: tuple[str, ...] = FREE) -> LandmarkFitResult:
    """Solve the landmark stage for each face (module docstring).

    Args:
        decoder: the face model's NumPy decoder (its camera is the crop camera).
        coeffs: ``B`` faces' starting coefficients (NumPy, e.g. the R-Net's).
        target: ``(B, 68, 2)`` crop px, y up (:attr:`facerecon.pipeline.PreparedFace.lm68_crop`).
        weights: ``(68,)`` or ``(B, 68)`` per-landmark weights (0 ignores a point); default the reference's.
        iterations: most damped Gauss-Newton steps per face; ``tol``: stop when a step lowers ``E`` by less than
            this share.
        free: the groups solved for (a subset of :data:`FREE`); the others keep their values (a set's shared
            identity: ``("exp", "angle", "trans")``).
    """
    unknown = set(free) - set(FREE)
    if unknown:
        raise ValueError(f"free groups must be among {FREE}, got {sorted(unknown)}")
    prior = prior or LandmarkPrior()
    c = coeffs.numpy().arrays()
    b = c.id.shape[0]
    tgt = np.asarray(target, np.float64).reshape(b, 68, 2)
    wts = np.broadcast_to(LANDMARK_WEIGHTS_68 if weights is None else np.asarray(weights, np.float64), (b, 68))
    ids, exps = c.id.astype(np.float64).copy(), c.exp.astype(np.float64).copy()
    angles, trans = c.angle.astype(np.float64).copy(), c.trans.astype(np.float64).copy()
    before, after, its = [], [], []
    solver = _Solver(decoder, prior)
    lay = decoder.layout
    mask = np.concatenate([np.full(n, g in free) for g, n in zip(FREE, (lay.id, lay.exp, 3, 3), strict=True)])
    if prior.center not in ("zero", "start", "start_exp"):
        raise ValueError(f"prior centre must be 'zero', 'start' or 'start_exp', got {prior.center!r}")
    for i in range(b):
        x = np.concatenate([ids[i], exps[i], angles[i], trans[i]])
        before.append(solver.error(x, tgt[i]))
        center = None
        if prior.center != "zero":
            center = x.copy()
            if prior.center == "start_exp":
                center[: solver.splits[0]] = 0.0
        x, n = solver.solve(x, tgt[i], wts[i], iterations, tol, mask, center)
        after.append(solver.error(x, tgt[i]))
        its.append(n)
        ids[i], exps[i], angles[i], trans[i] = np.split(x, solver.splits)
    f32 = np.float32
    out = Coefficients(ids.astype(f32), exps.astype(f32), c.tex.copy(), angles.astype(f32), c.gamma.copy(),
                       trans.astype(f32))
    return LandmarkFitResult(out, before, after, its)


def rotation_derivatives(angle: np.ndarray) -> np.ndarray:
    """``dR / d(θx, θy, θz)`` of ``R = Rz Ry Rx`` (:func:`rotation`): ``(3, 3, 3)``, the first axis the angle; the
    products ``Rz Ry dRx``, ``Rz dRy Rx``, ``dRz Ry Rx`` written out (a fit asks for them at every step)."""
    cx, cy, cz = (math.cos(float(a)) for a in angle)
    sx, sy, sz = (math.sin(float(a)) for a in angle)
    return np.array([
        [[0.0, cz * sy * cx + sz * sx, -cz * sy * sx + sz * cx],
         [0.0, sz * sy * cx - cz * sx, -sz * sy * sx - cz * cx],
         [0.0, cy * cx, -cy * sx]],
        [[-cz * sy, cz * cy * sx, cz * cy * cx],
         [-sz * sy, sz * cy * sx, sz * cy * cx],
         [-cy, -sy * sx, -sy * cx]],
        [[-sz * cy, -sz * sy * sx - cz * cx, -sz * sy * cx + cz * sx],
         [cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx],
         [0.0, 0.0, 0.0]],
    ])


def rotation(angle: np.ndarray) -> np.ndarray:
    """``R = Rz Ry Rx`` of ``(θx, θy, θz)`` radians (:func:`facerecon.npdecode.euler_to_rotation` for one face)."""
    cx, cy, cz = (math.cos(float(a)) for a in angle)
    sx, sy, sz = (math.sin(float(a)) for a in angle)
    return np.array([
        [cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx],
        [sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx],
        [-sy, cy * sx, cy * cx],
    ])


#: The fast path's landmark stage (:func:`landmark_stage`): the jaw contour's hidden half fades out of the
#: objective between these yaws (degrees); the solution fades back to the R-Net's between ``BLEND_DEG``: towards
#: profile the detector's 68 points (a mesh made for moderate yaw, the hidden side guessed) are worse than the R-Net's
#: own (on training-split CFP profiles and HELEN training photos, ``eval.rnet_pose`` mode ``rnet+lm``).
HIDDEN_JAW_DEG = (20.0, 40.0)
BLEND_DEG = (30.0, 50.0)
#: The fast path's prior: identity a third of the fit's, expression 30 times the identity's (the fit's 0.8 let the
#: expression weights chase the detector's points: on ``eval.synthetic``'s 40 faces the landmark stage then moved
#: the shape error from the R-Net's 3.69 to 5.66 mm; with 30, 3.63 mm, neutral shape 3.26 vs 3.27, and the 68-point
#: NME of HELEN training photos 3.45 -> 3.35 %; chosen on those training photos and synthetic faces, not on the
#: held-out sets).
FAST_PRIOR = LandmarkPrior(coef=1.0e-3, coef_exp=30.0)


def turned_weights(decoder: NumpyDecoder, yaw_deg: np.ndarray) -> np.ndarray:
    """``(B, 68)`` landmark weights for faces turned by ``yaw_deg`` ``(B,)``: the reference's, with the hidden half
    of the jaw contour faded out between :data:`HIDDEN_JAW_DEG` (the detector guesses those points; a 3D model's
    contour there curves away from the camera)."""
    yaw = np.asarray(yaw_deg, np.float64).reshape(-1)
    side = np.sign(decoder.landmark_basis[0][:17, 0])  # model x of the jaw contour's points (+x: the face's left)
    w = np.tile(LANDMARK_WEIGHTS_68, (len(yaw), 1))
    fade = np.clip((np.abs(yaw) - HIDDEN_JAW_DEG[0]) / (HIDDEN_JAW_DEG[1] - HIDDEN_JAW_DEG[0]), 0.0, 1.0)
    # a head turned by +yaw shows its -x side: the +x half of the contour curves away from the camera
    hidden = side[None, :] == np.sign(yaw)[:, None]
    w[:, :17] *= np.where(hidden, 1.0 - fade[:, None], 1.0)
    return w


def blend_back(yaw_deg: np.ndarray) -> np.ndarray:
    """``(B,)`` in [0, 1]: how far a face turned by ``yaw_deg`` ``(B,)`` goes back to the R-Net's own landmarks,
    0 below :data:`BLEND_DEG`, 1 beyond (towards profile the detector's 68 points are worse than the R-Net's)."""
    yaw = np.abs(np.asarray(yaw_deg, np.float64).reshape(-1))
    return np.clip((yaw - BLEND_DEG[0]) / (BLEND_DEG[1] - BLEND_DEG[0]), 0.0, 1.0)


def landmark_stage(decoder: NumpyDecoder, coeffs: Coefficients, target: np.ndarray,
                   prior: LandmarkPrior | None = None, free: tuple[str, ...] = FREE) -> LandmarkFitResult:
    """The R-Net path's landmark stage (mode ``rnet+lm``): :func:`refine_landmarks` from the R-Net's ``coeffs`` with
    each face's hidden jaw half faded out by its yaw (:data:`HIDDEN_JAW_DEG`), then blended back towards the R-Net's
    coefficients by yaw (:data:`BLEND_DEG`). ``target``: ``(B, 68, 2)`` crop px, y up."""
    c = coeffs.numpy().arrays()
    yaw = np.degrees(c.angle[:, 1].astype(np.float64))
    res = refine_landmarks(decoder, coeffs, target, turned_weights(decoder, yaw), prior or FAST_PRIOR, free=free)
    back = blend_back(yaw)
    if not back.any():
        return res
    r = res.coefficients.arrays()
    k = back[:, None].astype(np.float32)
    mixed = Coefficients(*[(1 - k) * a + k * b for a, b in zip(r, c, strict=True)])
    tgt = np.asarray(target, np.float64).reshape(len(yaw), 68, 2)
    end = np.linalg.norm(decoder.landmarks(mixed) - tgt, axis=-1).mean(-1)
    return LandmarkFitResult(mixed, res.error_start, [float(v) for v in end], res.iterations)


class _Solver:
    """One face's residuals and Jacobian over ``x = [alpha, beta, angle(3), trans(3)]`` (float64)."""

    def __init__(self, decoder: NumpyDecoder, prior: LandmarkPrior) -> None:
        k_id, k_exp = decoder.layout.id, decoder.layout.exp
        self.splits = [k_id, k_id + k_exp, k_id + k_exp + 3]
        self.mean, self.basis, self.basis_t = decoder.landmark_basis  # (68, 3), (K, 68, 3), (68, 3, K)
        self.basis_flat = self.basis.reshape(len(self.basis), 204)
        intr = decoder.camera.intrinsics
        self.fx, self.fy, self.cx, self.cy = intr.fx, intr.fy, intr.cx, intr.cy
        self.distance = float(decoder.camera.distance)
        # the prior's diagonal (per unknown) and the landmark term's scale
        self.reg = np.concatenate([np.full(k_id, prior.coef * prior.coef_id),
                                   np.full(k_exp, prior.coef * prior.coef_exp), np.zeros(6)])
        self.lm_scale = prior.landmark / 68.0

    def _shape(self, x: np.ndarray) -> np.ndarray:
        return self.mean + (x[: self.splits[1]] @ self.basis_flat).reshape(68, 3)

    def _camera(self, shape: np.ndarray, angle: np.ndarray, trans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rot = rotation(angle)
        world = shape @ rot.T + trans
        cam = np.concatenate([world[:, :2], self.distance - world[:, 2:3]], axis=1)
        return cam, rot

    def _project(self, cam: np.ndarray) -> np.ndarray:
        d = cam[:, 2]
        return np.stack([self.fx * cam[:, 0] / d + self.cx, self.fy * cam[:, 1] / d + self.cy], axis=1)

    def landmarks(self, x: np.ndarray) -> np.ndarray:
        cam, _ = self._camera(self._shape(x), x[self.splits[1]:self.splits[2]], x[self.splits[2]:])
        return self._project(cam)

    def error(self, x: np.ndarray, target: np.ndarray) -> float:
        return float(np.linalg.norm(self.landmarks(x) - target, axis=1).mean())

    def energy(self, x: np.ndarray, target: np.ndarray, w: np.ndarray, center: np.ndarray | None = None) -> float:
        r = self.landmarks(x) - target
        d = x if center is None else x - center
        return float(self.lm_scale * (w * (r ** 2).sum(1)).sum() + (self.reg * d ** 2).sum())

    def jacobian(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projected landmarks ``(68, 2)`` and their Jacobian ``(68, 2, K)``."""
        s1, s2 = self.splits[1], self.splits[2]
        shape = self._shape(x)
        angle, trans = x[s1:s2], x[s2:]
        cam, rot = self._camera(shape, angle, trans)
        d = cam[:, 2]
        inv = 1.0 / d
        q = np.stack([self.fx * cam[:, 0] * inv + self.cx, self.fy * cam[:, 1] * inv + self.cy], axis=1)
        # d q / d world (68, 2, 3): cam = (x, y, distance - z)
        dq = np.zeros((68, 2, 3))
        dq[:, 0, 0] = self.fx * inv
        dq[:, 0, 2] = self.fx * cam[:, 0] * inv * inv
        dq[:, 1, 1] = self.fy * inv
        dq[:, 1, 2] = self.fy * cam[:, 1] * inv * inv
        jac = np.empty((68, 2, x.size))
        # shape coefficients: world = R (mean + sum x_k B_k) + t
        jac[:, :, :s1] = (dq @ rot) @ self.basis_t  # d q / d shape, then through the basis
        # angles: world = R(θ) shape + t, so d world / d θk = shape dR_k^T
        d_world = shape @ rotation_derivatives(angle).transpose(0, 2, 1)  # (3, 68, 3)
        jac[:, :, s1:s2] = np.einsum("nij,knj->nik", dq, d_world)
        jac[:, :, s2:] = dq
        return q, jac

    def solve(self, x: np.ndarray, target: np.ndarray, w: np.ndarray, iterations: int, tol: float,
              free: np.ndarray | None = None, center: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Levenberg-Marquardt (Marquardt's diagonal scaling) from ``x`` over the unknowns ``free`` marks (all by
        default); returns the solution and the steps taken. The normal matrix is the symmetric product of the
        square-root-weighted Jacobian (one BLAS ``syrk``), the prior and the damping added on its diagonal in place."""
        every = free is None or bool(np.all(free))
        e = self.energy(x, target, w, center)
        c = np.zeros_like(x) if center is None else center
        wr = np.repeat(w, 2) * self.lm_scale
        sw = np.sqrt(wr)[:, None]
        reg = self.reg if every else self.reg[free]
        mu = 1e-3
        n = 0
        for n in range(1, iterations + 1):
            q, jac = self.jacobian(x)
            j = jac.reshape(136, -1) if every else jac.reshape(136, -1)[:, free]
            r = (q - target).reshape(136)
            js = j * sw
            h = js.T @ js  # J^T W J (NumPy calls syrk for a product with its own transpose)
            g = j.T @ (wr * r) + reg * ((x - c) if every else (x - c)[free])
            diag = h.diagonal() + reg
            h.flat[:: h.shape[0] + 1] = diag  # + the prior
            base = diag.copy()
            while True:
                h.flat[:: h.shape[0] + 1] = base + mu * (base + 1e-12)
                x_new = x.copy()
                if every:
                    x_new += np.linalg.solve(h, -g)
                else:
                    x_new[free] += np.linalg.solve(h, -g)
                e_new = self.energy(x_new, target, w, center)
                if e_new < e:
                    mu = max(mu / 3, 1e-7)
                    break
                mu *= 4
                if mu > 1e6:
                    return x, n
            done = (e - e_new) < tol * e
            x, e = x_new, e_new
            if done:
                break
        return x, n

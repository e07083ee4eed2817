"""Test-time fitting (analysis by synthesis) with the paper's hybrid loss.

Fits the coefficients of one photo, or of a set of photos of one person sharing identity and albedo, to the aligned
224 crops: first a cheap landmark stage (pose, identity, expression from the 68 landmarks, decoding only the
landmark vertices), then a photometric stage through the renderer (skin-attention L2,1 photometric loss inside the
visible ``face_mask`` region + landmark loss + coefficient, albedo-flatness and gamma regularisers, the reference's
weights: :func:`facerecon.objective.hybrid_terms` with ``region="face_mask"``, rendered at ``photo_size``). Starts
from R-Net's prediction or from the mean face (zero coefficients), which the alignment already places on the photo.

The photometric stage alternates two kinds of step (:class:`FitConfig`): every ``appearance_every`` steps light
and albedo are solved for with the geometry fixed (the lit colour is linear in the light given the albedo, and in
the albedo given the light; each solve minimises the reweighted-least-squares majoriser of the L2,1 term plus the
quadratic priors, so it never raises the loss), and every step Adam moves pose, identity and expression (and,
slowly, light and albedo). Albedo is what Adam alone converged slowest on. A stage can stop early once its loss
stalls (``stall_steps``). The optimiser is :class:`facerecon.adam.Adam` (``torch.optim.Adam``'s arithmetic without
importing the compiler; the fused engine runs the same update on NumPy arrays).

Two implementations of the same objective (``FitConfig.engine``):

* ``"fused"`` (the default on the CPU): the objective and its gradient written out in NumPy/numba, no autograd.
  The photometric term is rendered at ``photo_size`` (112: the photo and skin map average-pooled 2x, as
  ``hybrid_terms(size=112)``), and only the face: the shape, normals, shading and camera are evaluated on the
  vertices the ``face_mask`` region can reach (their one-ring for the normals; ~7.3K of the ICT model's 15.7K
  vertices), whose bases are gathered once per face model and kept. Visibility is the whole mesh's, as in
  ``hybrid_terms``: the whole mesh is rasterised once at the start of the stage and the pixels another part of
  the head covers (ears, neck, hair at large yaw) are left out; the face's own triangles are rasterised again every
  ``refresh_every`` steps. Per step: the covered pixels' perspective-correct barycentrics from the current
  vertices, the interpolated lit colour, the L2,1 residual and its analytic gradient to the colours and the camera
  positions (as the CPU rasteriser's backward), then SH shading, rotation, vertex and face normals backwards by
  hand, and two basis products; the light and albedo solves build their normal equations in numba too.
  ``tests/test_fit.py`` checks its loss and gradient against autograd through ``hybrid_terms`` (equal but for the
  occluding head parts, which are held from the stage's start) and its solve against the autograd engine's.
* ``"autograd"``: ``hybrid_terms`` through :meth:`Renderer.rasterize` with torch autograd (any renderer, any
  device: nvdiffrast on a GPU); its solves interpolate the colour's light and albedo Jacobians with the renderer.

Size: over 400 lines: the fused objective's kernels (forward and hand-written backward of the normals, shading,
barycentrics and landmark projection) belong to the one fit that uses them, next to its schedule.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import numpy as np
import torch
from numba import njit
from torch import Tensor

from facerecon import losses
from facerecon.adam import Adam
from facerecon.coefficients import Coefficients
from facerecon.decoder import FaceDecoder
from facerecon.geometry import INIT_LIGHT, SH_CONSTANTS
from facerecon.geometry import sh_basis as geometry_sh
from facerecon.npfit import rotation, rotation_derivatives
from facerecon.objective import CROP, hybrid_terms, landmark_terms
from facerecon.render.base import Renderer
from facerecon.render.cpu import ray_triple

log = logging.getLogger(__name__)

Engine = Literal["auto", "fused", "autograd"]


@dataclass(frozen=True)
class FitTarget:
    """What the fit matches, for a batch of B aligned crops.

    Attributes:
        image: ``(B, 3, 224, 224)`` float32 RGB in [0, 1].
        landmarks: ``(B, 68, 2)`` crop pixels, y up (the detector's 68 points mapped with the alignment).
        skin: ``(B, 1, 224, 224)`` skin attention in [0, 1] (:func:`facerecon.skin.skin_attention`), or None for 1.
        landmark_weights: ``(68,)`` or None for the reference weights.
    """

    image: Tensor
    landmarks: Tensor
    skin: Tensor | None = None
    landmark_weights: Tensor | None = None


@dataclass(frozen=True)
class FitConfig:
    """Settings of :func:`fit`. The defaults, against the former schedule (60 landmark + 30 photometric Adam steps
    at 224 px, light and albedo by Adam, lr 0.05) in one run of ``bench/bench_fit.py`` (25 example photos, R-Net +
    fit, 1 thread, load 1.8): fit 1584 -> ~200 ms median, photometric error 14.60 -> 14.37 mean abs, NME against the
    detector 0.0433 -> 0.0426. The schedule first landed with 16 photometric steps and no light ridge (151 ms,
    14.49, 0.0423; ``eval.rnet_pose``: AFW + HELEN (56) 3.31 -> 3.32 %, CFP profiles (46) 9.30 -> 9.35 % mean,
    4.73 -> 4.63 % median); the ridge (``light_prior``) steadies it for 4 more steps. The ablations below are
    single runs on the examples (and those two sets).

    Attributes:
        landmark_steps: most Adam steps of the landmark stage from a given start (R-Net's prediction).
        landmark_steps_from_mean: the same from the mean face (``init=None``, the mode without an R-Net), which
            starts further off: 60 steps left its landmarks short (NME 0.047 against 0.042 with 120).
        photo_steps: most steps of the photometric stage (0: a landmark-only fit).
        photo_size: side (px) the photometric term is rendered at; the 224 crop and its skin map are average-pooled
            to it (a divisor of 224). 112 scores as 224 does (former schedule: 14.68 vs 14.66 photometric error,
            NME 0.0431 vs 0.0433) on a quarter of the pixels; 56 lost 0.1-0.2.
        appearance_every: every this many photometric steps (from the first), light and albedo are solved for
            exactly with the geometry fixed (the colours are linear in either; reweighted least squares on the L2,1
            term, so the loss never rises); 0: never (the former schedule: Adam alone, on which albedo converged
            slowest, ~0.2 per coefficient still to go after 30 steps). 16 steps with a solve every 2nd reach what
            30 did not (without the light ridge).
        light_prior: the light solve is a ridge regression towards the light the photometric stage started from
            (R-Net's), weighted this times the mean diagonal of the solve's system. The face region the photo shows
            leaves some light directions nearly unseen (they light the back of the head, and trade against the
            albedo), and unpinned, exact solves slid along them: one photo's fit with its detector landmarks
            jittered by 0.5 px changed the whole mesh's lit colours by 2.76 grey levels mean, 8.6 at most (25
            example photos; the same photo asked alone and with faces=all, whose landmarks then differed by a few
            px, 12.8 apart). Ridge 0.01 / 0.003 with 20 steps: 1.25 / 1.40 (at most 3.8 / 4.7) at a photometric
            error of 14.52 / 14.39 (no ridge, 16 steps: 14.51; 20 steps: 14.24 but 2.94 apart); 0.01 on the
            albedo solve as well cost 0.3 of photometric error for little more.
        refresh_every: the fused engine rasterises the face again every this many photometric steps (1: every
            step, as the autograd engine; between refreshes each pixel keeps its triangle and its barycentrics
            follow the vertices: 2 cost 0.6 of photometric error).
        stall_steps, stall_tol: a stage stops once the best of its last ``stall_steps`` losses is not ``stall_tol``
            (relative) below its best before them (0 steps: never, the default). With this short schedule it does
            not pay: 5 steps / 1e-3 stopped 2 of the 25 example fits early and saved no time, and from the mean
            face stopped one landmark stage at step 13 in Adam's early wobble (NME 0.046 -> 0.054); 3 / 3e-3 saved
            a third of the time for 0.2 more photometric error.
        lr_pose, lr_shape, lr_light, lr_albedo: Adam learning rates of angles and translation (x 0.3 in the
            photometric stage), identity and expression, light, albedo. Between solves Adam moves light and albedo
            slowly (0.01; held still they scored 0.15 worse photometrically and on CFP profiles 0.06 % worse).
            Identity and expression at 0.03 rather than the former 0.05: landmarks nearer the detector's and the
            annotations (examples NME 0.0434 -> 0.0423, AFW + HELEN 3.33 -> 3.32 %, CFP 9.41 -> 9.35 %) for 0.15
            more photometric error.
        share_identity: one identity and albedo for the whole batch (a set of photos of one person).
        engine: ``"fused"`` (hand-written gradients, CPU), ``"autograd"`` (torch autograd through the renderer),
            ``"auto"``: fused for a CPU renderer and CPU tensors, else autograd (module docstring). The two give the
            same losses and gradients (``tests/test_fit.py``); a fit through autograd takes ~7x as long on the CPU.
        weights: the loss weights.
    """

    landmark_steps: int = 60
    landmark_steps_from_mean: int = 120
    photo_steps: int = 20
    photo_size: int = 112
    appearance_every: int = 2
    light_prior: float = 0.003
    refresh_every: int = 1
    stall_steps: int = 0
    stall_tol: float = 1e-3
    lr_pose: float = 0.01
    lr_shape: float = 0.03
    lr_light: float = 0.01
    lr_albedo: float = 0.01
    share_identity: bool = False
    engine: Engine = "auto"
    #: The reference's training weights, except a 10x stronger coefficient prior (3e-3): one photo's 2D evidence
    #: under-determines identity, and on synthetic faces with known shape (eval.synthetic, 10 samples, R-Net +
    #: fit) the 10x prior cut the vertex error from 4.66 to 4.17 mm (neutral shape 3.76 -> 3.48 mm, now below the
    #: mean face's 3.57) for 0.26 px more landmark error. Training keeps the reference's 3e-4.
    weights: losses.LossWeights = field(default_factory=lambda: losses.LossWeights(coef=3.0e-3))

    def __post_init__(self) -> None:
        if self.photo_size <= 0 or CROP % self.photo_size:
            raise ValueError(f"photo_size must divide {CROP}, got {self.photo_size}")
        if self.refresh_every < 1 or self.appearance_every < 0:
            raise ValueError(f"need refresh_every >= 1 and appearance_every >= 0, got {self.refresh_every} and "
                             f"{self.appearance_every}")
        if self.engine not in ("auto", "fused", "autograd"):
            raise ValueError(f"engine must be 'auto', 'fused' or 'autograd', got {self.engine!r}")


@dataclass
class FitResult:
    coefficients: Coefficients
    landmark_error_start: list[float]
    landmark_error_end: list[float]
    history: list[dict[str, float]]
    seconds: float


def landmark_error(pred: Tensor, target: Tensor) -> list[float]:
    """Per-image mean Euclidean landmark error in crop pixels."""
    return (pred - target).norm(dim=-1).mean(dim=-1).tolist()


class _Params(torch.nn.Module):
    def __init__(self, init: Coefficients, share_identity: bool) -> None:
        super().__init__()
        idc, tex = init.id, init.tex
        if share_identity:
            idc, tex = idc.mean(0, keepdim=True), tex.mean(0, keepdim=True)
        self.share = share_identity
        self.batch = init.batch_size
        self.id = torch.nn.Parameter(idc.detach().clone())
        self.tex = torch.nn.Parameter(tex.detach().clone())
        self.exp = torch.nn.Parameter(init.exp.detach().clone())
        self.angle = torch.nn.Parameter(init.angle.detach().clone())
        self.gamma = torch.nn.Parameter(init.gamma.detach().clone())
        self.trans = torch.nn.Parameter(init.trans.detach().clone())

    def coefficients(self) -> Coefficients:
        idc, tex = self.id, self.tex
        if self.share:
            idc, tex = idc.expand(self.batch, -1), tex.expand(self.batch, -1)
        return Coefficients(idc, self.exp, tex, self.angle, self.gamma, self.trans)


class _Stall:
    """Early stopping: ``stalled()`` once the best loss of the last ``steps`` losses is not ``tol`` below the best
    before them."""

    def __init__(self, steps: int, tol: float) -> None:
        self.steps, self.tol, self.losses = steps, tol, []  # type: ignore[var-annotated]

    def stalled(self, loss: float) -> bool:
        self.losses.append(loss)
        if self.steps <= 0 or len(self.losses) <= self.steps:
            return False
        before = min(self.losses[: -self.steps])
        return min(self.losses[-self.steps:]) > before - self.tol * abs(before)


def _use_fused(cfg: FitConfig, decoder: FaceDecoder, renderer: Renderer | None, target: FitTarget) -> bool:
    if cfg.engine != "auto":
        return cfg.engine == "fused"
    on_cpu = target.image.device.type == "cpu" and decoder.model.mean_shape.device.type == "cpu"
    return on_cpu and (renderer is None or renderer.name == "cpu") and decoder.model.mean_shape.dtype == torch.float32


def fit(
    decoder: FaceDecoder,
    renderer: Renderer | None,
    target: FitTarget,
    init: Coefficients | None = None,
    config: FitConfig | None = None,
) -> FitResult:
    """Fit coefficients to ``target``; ``renderer=None`` or ``photo_steps=0`` fits landmarks only.

    Returns the fitted coefficients (detached), the landmark error (crop px) before and after, and the loss history
    (one entry per step: ``stage`` 1 or 2, ``loss``, ``landmark``, and ``photo`` in stage 2).
    """
    cfg = config or FitConfig()
    t0 = time.perf_counter()
    device = target.image.device
    b = target.image.shape[0]
    layout = decoder.model.layout
    if init is None:
        init = Coefficients.zeros(layout, b, device)
        cfg = replace(cfg, landmark_steps=cfg.landmark_steps_from_mean)
    params = _Params(init, cfg.share_identity)
    history: list[dict[str, float]] = []
    photometric = renderer is not None and cfg.photo_steps > 0

    with torch.no_grad():
        err_start = landmark_error(decoder.landmarks(params.coefficients()), target.landmarks)

    if _use_fused(cfg, decoder, renderer, target):
        _fit_fused(_FusedObjective.of(decoder), params, target, cfg, photometric, history)
    else:
        _fit_autograd(decoder, renderer, params, target, cfg, photometric, history)

    final = params.coefficients().detach()
    with torch.no_grad():
        err_end = landmark_error(decoder.landmarks(final), target.landmarks)
    seconds = time.perf_counter() - t0
    log.debug("fit %d image(s): landmark error %s -> %s px in %.2f s", b, err_start, err_end, seconds)
    return FitResult(final, err_start, err_end, history, seconds)


def _fit_autograd(decoder: FaceDecoder, renderer: Renderer | None, params: _Params, target: FitTarget,
                  cfg: FitConfig, photometric: bool, history: list[dict[str, float]]) -> None:
    """Both stages through torch autograd (``landmark_terms``, then ``hybrid_terms`` through ``renderer``)."""
    w, lm_w = cfg.weights, target.landmark_weights
    # Stage 1: landmarks (pose, shape, expression), relative weights as in the total loss.
    opt = Adam([
        {"params": [params.angle, params.trans], "lr": cfg.lr_pose},
        {"params": [params.id, params.exp], "lr": cfg.lr_shape},
    ])
    stall = _Stall(cfg.stall_steps, cfg.stall_tol)
    for _ in range(cfg.landmark_steps):
        t = landmark_terms(decoder, params.coefficients(), target.landmarks, lm_w, w)
        loss = t.total(w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"stage": 1.0, "loss": loss.item(), "landmark": t.landmark.item()})
        if stall.stalled(history[-1]["loss"]):
            break
    if not photometric:
        return
    # Stage 2: photometric through the renderer; Adam moves the geometry (and the appearance, without solves).
    opt = Adam([
        {"params": [params.angle, params.trans], "lr": cfg.lr_pose * 0.3},
        {"params": [params.id, params.exp], "lr": cfg.lr_shape},
        {"params": [params.tex], "lr": cfg.lr_albedo},
        {"params": [params.gamma], "lr": cfg.lr_light},
    ])
    stall = _Stall(cfg.stall_steps, cfg.stall_tol)
    skin = target.skin if target.skin is not None else torch.ones_like(target.image[:, :1])
    light_start = params.gamma.detach().clone()
    for step in range(cfg.photo_steps):
        if _solves(cfg, step):
            _solve_appearance_autograd(decoder, renderer, params, target, skin, cfg,  # type: ignore[arg-type]
                                       light_start)
        # the photometric region: the model's face region where it is visible in the photo
        t = hybrid_terms(decoder, renderer, params.coefficients(), target.image, skin,  # type: ignore[arg-type]
                         target.landmarks, region="face_mask", lm_weights=lm_w, size=cfg.photo_size, w=w)
        loss = t.total(w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"stage": 2.0, "loss": loss.item(), "photo": t.photo.item(), "landmark": t.landmark.item(),
                        "step": float(step)})
        if stall.stalled(history[-1]["loss"]):
            break


def _light_prior(a: np.ndarray | Tensor, rel: float) -> float:
    """The light solve's ridge weight (towards the light the photometric stage started from): ``rel`` times the
    mean diagonal of the solve's system ``a`` (so it scales with the photo's evidence, not with its pixel count)."""
    return rel * float(a.diagonal().sum()) / a.shape[0]


def _solves(cfg: FitConfig, step: int) -> bool:
    """Whether photometric ``step`` starts with the light and albedo solve."""
    return bool(cfg.appearance_every) and step % cfg.appearance_every == 0


@torch.no_grad()
def _solve_appearance_autograd(decoder: FaceDecoder, renderer: Renderer, params: _Params, target: FitTarget,
                               skin: Tensor, cfg: FitConfig, light_start: Tensor | None = None) -> None:
    """The light and albedo block steps of the fused engine (:meth:`_PhotometricStage._solve_appearance`) through
    any renderer: the colour's derivatives with respect to the light and albedo coefficients are per-vertex
    attributes, interpolated with the renderer like the colour. The region and weights are ``hybrid_terms``';
    ``light_start`` ``(B, 27)`` the light the ridge pulls towards (default: the current light)."""
    w, m = cfg.weights, decoder.model
    k = CROP // cfg.photo_size
    photo = torch.nn.functional.avg_pool2d(target.image, k) if k > 1 else target.image
    sk = torch.nn.functional.avg_pool2d(skin, k) if k > 1 else skin
    intr = decoder.camera.intrinsics.scaled(cfg.photo_size / CROP)
    face = decoder(params.coefficients())
    tris = m.triangles
    raster = renderer.rasterize(face.vertices_cam, tris, intr)
    area = renderer.interpolate(m.face_mask.to(photo.dtype)[None, :, None], raster, tris)[..., 0]
    weight = sk[:, 0] * (area > 0.5).to(photo.dtype)  # (B, S, S)
    norm = weight.sum().clamp(min=1.0)
    image = photo.permute(0, 2, 3, 1)  # (B, S, S, 3)
    nb, n = face.albedo.shape[0], m.n_vertices
    sh = geometry_sh(face.normals_world)  # (B, N, 9)

    def irls(colors: Tensor) -> Tensor:
        cur = renderer.interpolate(colors, raster, tris)
        return w.photo * weight / (norm * torch.sqrt(1e-6 + ((cur - image) ** 2).sum(-1)))  # (B, S, S)

    # light, per image: colour_ch = G_ch . gamma'_ch
    u = irls(face.colors)
    g = renderer.interpolate((face.albedo[..., :, None] * sh[..., None, :]).reshape(nb, n, 27), raster, tris)
    g = g.reshape(nb, -1, 3, 9).double()
    uu = u.reshape(nb, -1, 1).double()
    prior = (2.0 * w.gamma / (27 * nb)) * np.kron(np.eye(3) - 1.0 / 3.0, np.eye(9))
    gam = params.gamma.detach().clone()
    start = (gam if light_start is None else light_start.detach()).double().view(nb, 3, 9).clone()
    start[:, :, 0] += INIT_LIGHT
    for b in range(nb):
        a = torch.from_numpy(prior).to(g).clone()  # (from_numpy shares the array, and .to may not copy)
        rhs = torch.zeros(27, dtype=g.dtype, device=g.device)
        for ch in range(3):
            gc = g[b, :, ch]  # (S*S, 9)
            a[ch * 9:(ch + 1) * 9, ch * 9:(ch + 1) * 9] += (gc * uu[b]).T @ gc
            rhs[ch * 9:(ch + 1) * 9] = (gc * uu[b]).T @ image[b].reshape(-1, 3)[:, ch].double()
        mu = _light_prior(a, cfg.light_prior)
        eye = torch.eye(27, dtype=a.dtype, device=a.device)
        sol = torch.linalg.solve(a + mu * eye, rhs + mu * start[b].reshape(-1).to(a)).reshape(3, 9)
        sol[:, 0] -= INIT_LIGHT
        gam[b] = sol.reshape(-1).to(gam)
    params.gamma.copy_(gam)
    lit = gam.view(nb, 3, 9).clone()
    lit[:, :, 0] += INIT_LIGHT
    shade = torch.einsum("bnk,bck->bnc", sh, lit)  # (B, N, 3)
    # albedo: colour = shade * (mean + B tex), per image or shared
    u = irls(face.albedo * shade).reshape(nb, -1, 1).double()
    basis = m.albedo_basis.view(-1, n, 3).permute(1, 2, 0)  # (N, 3, K)
    k_tex = basis.shape[2]
    jac = renderer.interpolate((shade[..., None] * basis[None]).reshape(nb, n, 3 * k_tex), raster, tris)
    jac = jac.reshape(nb, -1, 3, k_tex).double()
    const = renderer.interpolate(shade * m.mean_albedo[None], raster, tris).reshape(nb, -1, 3).double()
    res = const - image.reshape(nb, -1, 3).double()
    rows = 1 if params.share else nb
    rep = nb if params.share else 1
    h = torch.zeros(rows, k_tex, k_tex, dtype=jac.dtype, device=jac.device)
    rhs = torch.zeros(rows, k_tex, dtype=jac.dtype, device=jac.device)
    for b in range(nb):
        r = 0 if params.share else b
        jb = jac[b].reshape(-1, k_tex)
        ub = u[b].expand(-1, 3).reshape(-1, 1)
        h[r] += (jb * ub).T @ jb
        rhs[r] += (jb * ub).T @ res[b].reshape(-1)
    refl = 2.0 * w.reflectance * rep / (nb * int(m.skin_mask.sum()))
    q_mat, q_vec, _ = _reflectance_quadratic(m)
    eye = torch.eye(k_tex, dtype=h.dtype, device=h.device)
    h = h + (2.0 * w.coef * w.coef_tex * rep / nb) * eye + refl * q_mat.to(h)
    params.tex.copy_(torch.linalg.solve(h, -(rhs + refl * q_vec.to(h))).to(params.tex))


def _reflectance_quadratic(m: torch.nn.Module) -> tuple[Tensor, Tensor, float]:
    """``(Q, q, |a|^2)`` with ``sum_R (T - mean_R T)^2 = |a|^2 + 2 q . tex + tex Q tex`` over the skin vertices R, for
    ``T = mean + tex . B`` (``losses.reflectance_loss`` times B |R|)."""
    skin = torch.nonzero(m.skin_mask).squeeze(1)
    k = m.albedo_basis.shape[0]
    b_skin = m.albedo_basis.view(k, -1, 3)[:, skin].double()
    a_skin = m.mean_albedo[skin].double()
    c = (b_skin - b_skin.mean(dim=1, keepdim=True)).reshape(k, -1)
    a = (a_skin - a_skin.mean(dim=0, keepdim=True)).reshape(-1)
    return c @ c.T, c @ a, float(a @ a)

# ----------------------------------------------------------------------------------------------------------------
# The fused objective (engine "fused"): hybrid_terms(region="face_mask") + landmark_terms with written-out gradients

_A0C0, _A1C1, _A2C2 = SH_CONSTANTS
_A2C2_7 = _A2C2 / (2.0 * math.sqrt(3.0))
_EPS = 1e-12  # torch.nn.functional.normalize's


@njit(cache=True, nogil=True)
def _shade_forward(s, tris, pb, rot, trans, albedo, gam, distance, fn, fnorm, n, vnorm, nw, sh, shade, color, cam):
    """Normals, SH shading and camera positions of the face's vertices (``geometry.vertex_normals``,
    ``sh_shading``, ``transform``, ``to_camera``). ``s`` ``(M2, 3)`` un-posed shape, the first ``M`` rows the
    face's vertices, the rest their one-ring; ``tris`` ``(T, 3)`` the triangles around them; ``pb`` ``(M, P)`` their
    incident triangles (``T`` pads); ``gam`` ``(3, 9)`` with the ambient 0.8 added. Writes the other arrays."""
    for f in range(tris.shape[0]):
        i, j, k = tris[f, 0], tris[f, 1], tris[f, 2]
        ax, ay, az = s[i, 0] - s[j, 0], s[i, 1] - s[j, 1], s[i, 2] - s[j, 2]
        bx, by, bz = s[j, 0] - s[k, 0], s[j, 1] - s[k, 1], s[j, 2] - s[k, 2]
        cx, cy, cz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
        ln = math.sqrt(cx * cx + cy * cy + cz * cz)
        fnorm[f] = ln
        inv = 1.0 / max(ln, _EPS)
        fn[f, 0], fn[f, 1], fn[f, 2] = cx * inv, cy * inv, cz * inv
    n_tri = tris.shape[0]
    for v in range(pb.shape[0]):
        x = y = z = 0.0
        for q in range(pb.shape[1]):
            f = pb[v, q]
            if f < n_tri:
                x += fn[f, 0]
                y += fn[f, 1]
                z += fn[f, 2]
        ln = math.sqrt(x * x + y * y + z * z)
        vnorm[v] = ln
        inv = 1.0 / max(ln, _EPS)
        x, y, z = x * inv, y * inv, z * inv
        n[v, 0], n[v, 1], n[v, 2] = x, y, z
        nx = rot[0, 0] * x + rot[0, 1] * y + rot[0, 2] * z
        ny = rot[1, 0] * x + rot[1, 1] * y + rot[1, 2] * z
        nz = rot[2, 0] * x + rot[2, 1] * y + rot[2, 2] * z
        nw[v, 0], nw[v, 1], nw[v, 2] = nx, ny, nz
        sh[v, 0] = _A0C0
        sh[v, 1] = -_A1C1 * ny
        sh[v, 2] = _A1C1 * nz
        sh[v, 3] = -_A1C1 * nx
        sh[v, 4] = _A2C2 * nx * ny
        sh[v, 5] = -_A2C2 * ny * nz
        sh[v, 6] = _A2C2_7 * (3.0 * nz * nz - 1.0)
        sh[v, 7] = -_A2C2 * nx * nz
        sh[v, 8] = 0.5 * _A2C2 * (nx * nx - ny * ny)
        for ch in range(3):
            acc = 0.0
            for k in range(9):
                acc += gam[ch, k] * sh[v, k]
            shade[v, ch] = acc
            color[v, ch] = albedo[v, ch] * acc
        for a in range(3):
            wv = rot[a, 0] * s[v, 0] + rot[a, 1] * s[v, 1] + rot[a, 2] * s[v, 2] + trans[a]
            cam[v, a] = distance - wv if a == 2 else wv


@njit(cache=True, nogil=True, inline="always")
def _ray_barycentrics(cam, tri, rx, ry, vs, bc):
    """The perspective-correct barycentrics of the ray ``(rx, ry, 1)`` in triangle ``tri`` of ``cam`` ``(M, 3)``, as
    the CPU rasteriser computes them (``b_i = e_i / sum e``, ``e_i = r . (V_j x V_k)``, :func:`ray_triple`): the
    triangle's vertices into ``vs`` (3, 3), the barycentrics into ``bc`` (3,); returns ``1 / sum e``."""
    for m in range(3):
        for c in range(3):
            vs[m, c] = cam[tri[m], c]
    for m in range(3):
        j, k = (m + 1) % 3, (m + 2) % 3
        bc[m] = ray_triple(rx, ry, vs[j, 0], vs[j, 1], vs[j, 2], vs[k, 0], vs[k, 1], vs[k, 2])
    inv = 1.0 / (bc[0] + bc[1] + bc[2])
    for m in range(3):
        bc[m] *= inv
    return inv


@njit(cache=True, nogil=True)
def _photo_kernel(cam, color, pix_tris, rays, target, weight, scale, g_cam, g_color):
    """``sum_p weight_p sqrt(1e-6 + |c_p - I_p|^2)`` over the selected pixels, ``c_p`` the colour interpolated with
    the perspective-correct barycentrics of the pixel's ray ``(rx, ry, 1)`` in its triangle (``b_i = e_i / sum e``,
    ``e_0 = r . (V_1 x V_2)``, the CPU rasteriser's formula); accumulates ``scale`` x its gradient into ``g_cam``
    and ``g_color`` ``(M, 3)``."""
    total = 0.0
    vs = np.empty((3, 3))
    e = np.empty(3)
    gb = np.empty(3)
    for p in range(pix_tris.shape[0]):
        rx, ry = rays[p, 0], rays[p, 1]
        inv = _ray_barycentrics(cam, pix_tris[p], rx, ry, vs, e)
        i0, i1, i2 = pix_tris[p, 0], pix_tris[p, 1], pix_tris[p, 2]
        r0 = e[0] * color[i0, 0] + e[1] * color[i1, 0] + e[2] * color[i2, 0] - target[p, 0]
        r1 = e[0] * color[i0, 1] + e[1] * color[i1, 1] + e[2] * color[i2, 1] - target[p, 1]
        r2 = e[0] * color[i0, 2] + e[1] * color[i1, 2] + e[2] * color[i2, 2] - target[p, 2]
        dist = math.sqrt(1e-6 + r0 * r0 + r1 * r1 + r2 * r2)
        total += weight[p] * dist
        g = scale * weight[p] / dist
        g0, g1, g2 = g * r0, g * r1, g * r2
        mean = 0.0
        for m in range(3):
            v = pix_tris[p, m]
            g_color[v, 0] += e[m] * g0
            g_color[v, 1] += e[m] * g1
            g_color[v, 2] += e[m] * g2
            gb[m] = g0 * color[v, 0] + g1 * color[v, 1] + g2 * color[v, 2]
            mean += gb[m] * e[m]
        for m in range(3):
            ge = (gb[m] - mean) * inv
            j, k = (m + 1) % 3, (m + 2) % 3
            vj, vk = pix_tris[p, j], pix_tris[p, k]
            # d e_m / d V_j = V_k x r ; d e_m / d V_k = r x V_j  (r = (rx, ry, 1))
            g_cam[vj, 0] += ge * (vs[k, 1] - vs[k, 2] * ry)
            g_cam[vj, 1] += ge * (vs[k, 2] * rx - vs[k, 0])
            g_cam[vj, 2] += ge * (vs[k, 0] * ry - vs[k, 1] * rx)
            g_cam[vk, 0] += ge * (ry * vs[j, 2] - vs[j, 1])
            g_cam[vk, 1] += ge * (vs[j, 0] - rx * vs[j, 2])
            g_cam[vk, 2] += ge * (rx * vs[j, 1] - ry * vs[j, 0])
    return total


@njit(cache=True, nogil=True)
def _shade_backward(g_cam, g_color, s, tris, pb, rot, albedo, gam, fn, fnorm, n, vnorm, sh, shade,
                    g_s, g_rot, g_trans, g_albedo, g_gam, g_fn):
    """Backward of :func:`_shade_forward` from ``g_cam`` and ``g_color`` ``(M, 3)``: accumulates the shape
    ``g_s`` ``(M2, 3)``, rotation ``g_rot`` (3, 3), translation, albedo ``(M, 3)`` and light ``(3, 9)`` gradients
    (``g_fn`` ``(T, 3)``: workspace)."""
    n_tri = tris.shape[0]
    g_fn[:] = 0.0
    gy = np.empty(9)
    gw = np.empty(3)
    gn = np.empty(3)
    gnw = np.empty(3)
    for v in range(pb.shape[0]):
        # camera (x, y, distance - z) of R s + t
        gw[0], gw[1], gw[2] = g_cam[v, 0], g_cam[v, 1], -g_cam[v, 2]
        for a in range(3):
            g_trans[a] += gw[a]
            for c in range(3):
                g_rot[a, c] += gw[a] * s[v, c]
                g_s[v, c] += rot[a, c] * gw[a]
        # colour = albedo * (gam . Y(R n))
        gy[:] = 0.0
        for ch in range(3):
            g_albedo[v, ch] += g_color[v, ch] * shade[v, ch]
            gsh = g_color[v, ch] * albedo[v, ch]
            for k in range(9):
                g_gam[ch, k] += gsh * sh[v, k]
                gy[k] += gsh * gam[ch, k]
        nx, ny, nz = (rot[0, 0] * n[v, 0] + rot[0, 1] * n[v, 1] + rot[0, 2] * n[v, 2],
                      rot[1, 0] * n[v, 0] + rot[1, 1] * n[v, 1] + rot[1, 2] * n[v, 2],
                      rot[2, 0] * n[v, 0] + rot[2, 1] * n[v, 1] + rot[2, 2] * n[v, 2])
        gnw[0] = -_A1C1 * gy[3] + _A2C2 * ny * gy[4] - _A2C2 * nz * gy[7] + _A2C2 * nx * gy[8]
        gnw[1] = -_A1C1 * gy[1] + _A2C2 * nx * gy[4] - _A2C2 * nz * gy[5] - _A2C2 * ny * gy[8]
        gnw[2] = _A1C1 * gy[2] - _A2C2 * ny * gy[5] + 6.0 * _A2C2_7 * nz * gy[6] - _A2C2 * nx * gy[7]
        gn[:] = 0.0
        for a in range(3):
            for c in range(3):
                g_rot[a, c] += gnw[a] * n[v, c]
                gn[c] += rot[a, c] * gnw[a]
        # n = normalize(sum of the incident unit face normals)
        ln = vnorm[v]
        dot = gn[0] * n[v, 0] + gn[1] * n[v, 1] + gn[2] * n[v, 2]
        if ln > _EPS:
            gv = ((gn[0] - n[v, 0] * dot) / ln, (gn[1] - n[v, 1] * dot) / ln, (gn[2] - n[v, 2] * dot) / ln)
        else:
            gv = (gn[0] / _EPS, gn[1] / _EPS, gn[2] / _EPS)
        for q in range(pb.shape[1]):
            f = pb[v, q]
            if f < n_tri:
                g_fn[f, 0] += gv[0]
                g_fn[f, 1] += gv[1]
                g_fn[f, 2] += gv[2]
    for f in range(n_tri):
        ln = fnorm[f]
        dot = g_fn[f, 0] * fn[f, 0] + g_fn[f, 1] * fn[f, 1] + g_fn[f, 2] * fn[f, 2]
        if ln > _EPS:
            gcx, gcy, gcz = ((g_fn[f, 0] - fn[f, 0] * dot) / ln, (g_fn[f, 1] - fn[f, 1] * dot) / ln,
                             (g_fn[f, 2] - fn[f, 2] * dot) / ln)
        else:
            gcx, gcy, gcz = g_fn[f, 0] / _EPS, g_fn[f, 1] / _EPS, g_fn[f, 2] / _EPS
        i, j, k = tris[f, 0], tris[f, 1], tris[f, 2]
        ax, ay, az = s[i, 0] - s[j, 0], s[i, 1] - s[j, 1], s[i, 2] - s[j, 2]
        bx, by, bz = s[j, 0] - s[k, 0], s[j, 1] - s[k, 1], s[j, 2] - s[k, 2]
        # c = a x b: dL/da = b x g, dL/db = g x a
        gax, gay, gaz = by * gcz - bz * gcy, bz * gcx - bx * gcz, bx * gcy - by * gcx
        gbx, gby, gbz = gcy * az - gcz * ay, gcz * ax - gcx * az, gcx * ay - gcy * ax
        g_s[i, 0] += gax
        g_s[i, 1] += gay
        g_s[i, 2] += gaz
        g_s[j, 0] += gbx - gax
        g_s[j, 1] += gby - gay
        g_s[j, 2] += gbz - gaz
        g_s[k, 0] -= gbx
        g_s[k, 1] -= gby
        g_s[k, 2] -= gbz


@njit(cache=True, nogil=True)
def _landmark_kernel(geo, mean, basis, rot, trans, target, weight, fx, fy, cx, cy, distance, scale, g_geo, g_rot,
                     g_trans, s, g_s):
    """``scale * sum_n w_n |proj(R s_n + t) - l_n|^2`` (``losses.landmark_loss`` of one image) with ``s = mean +
    geo . basis`` (``basis`` ``(K, 68 * 3)``), and its gradient, accumulated into ``g_geo`` ``(K,)``, ``g_rot``,
    ``g_trans`` (``s``, ``g_s`` ``(68, 3)``: workspace)."""
    n_pts = mean.shape[0]
    for p in range(n_pts):
        for c in range(3):
            s[p, c] = mean[p, c]
            g_s[p, c] = 0.0
    for k in range(geo.shape[0]):
        gk = geo[k]
        for p in range(n_pts):
            for c in range(3):
                s[p, c] += gk * basis[k, 3 * p + c]
    total = 0.0
    for p in range(n_pts):
        wx = rot[0, 0] * s[p, 0] + rot[0, 1] * s[p, 1] + rot[0, 2] * s[p, 2] + trans[0]
        wy = rot[1, 0] * s[p, 0] + rot[1, 1] * s[p, 1] + rot[1, 2] * s[p, 2] + trans[1]
        wz = rot[2, 0] * s[p, 0] + rot[2, 1] * s[p, 1] + rot[2, 2] * s[p, 2] + trans[2]
        d = distance - wz
        ru = fx * wx / d + cx - target[p, 0]
        rv = fy * wy / d + cy - target[p, 1]
        total += weight[p] * (ru * ru + rv * rv)
        gu, gv = 2.0 * scale * weight[p] * ru, 2.0 * scale * weight[p] * rv
        gw = (gu * fx / d, gv * fy / d, (gu * fx * wx + gv * fy * wy) / (d * d))
        for a in range(3):
            g_trans[a] += gw[a]
            for c in range(3):
                g_rot[a, c] += gw[a] * s[p, c]
                g_s[p, c] += rot[a, c] * gw[a]
    for k in range(geo.shape[0]):
        acc = 0.0
        for p in range(n_pts):
            for c in range(3):
                acc += basis[k, 3 * p + c] * g_s[p, c]
        g_geo[k] += acc
    return scale * total


@njit(cache=True, nogil=True)
def _select_kernel(pixels, pix_verts, bary, face_mask, occluded, photo, skin, size, fx, fy, cx, cy):
    """The covered pixels in the region: interpolated ``face_mask`` over 0.5 and nothing else of the head in front.
    Returns their triangles' vertices ``(P, 3)``, rays ``(P, 2)``, photo colours ``(P, 3)``, skin weights ``(P,)``."""
    keep = np.zeros(pixels.shape[0], np.bool_)
    count = 0
    for p in range(pixels.shape[0]):
        area = (bary[p, 0] * face_mask[pix_verts[p, 0]] + bary[p, 1] * face_mask[pix_verts[p, 1]]
                + bary[p, 2] * face_mask[pix_verts[p, 2]])
        if area > 0.5 and not occluded[pixels[p]]:
            keep[p] = True
            count += 1
    verts = np.empty((count, 3), np.int64)
    rays = np.empty((count, 2))
    colours = np.empty((count, 3))
    weights = np.empty(count)
    q = 0
    for p in range(pixels.shape[0]):
        if keep[p]:
            i = pixels[p]
            row, col = i // size, i % size
            for c in range(3):
                verts[q, c] = pix_verts[p, c]
                colours[q, c] = photo[c, i]
            rays[q, 0] = (col + 0.5 - cx) / fx
            rays[q, 1] = (size - 0.5 - row - cy) / fy
            weights[q] = skin[i]
            q += 1
    return verts, rays, colours, weights


@njit(cache=True, nogil=True)
def _appearance_system(cam, color, shade, albedo, mean_albedo, basis, sh, pix_tris, rays, target, weight, scale,
                       want_tex, jac_tex, res_tex, h_light, rhs_light):
    """The normal equations of one appearance block with the geometry fixed, for the L2,1 term's reweighted
    quadratic majoriser ``sum_p u_p / 2 |c_p - I_p|^2`` with ``u_p = scale weight_p / |c_p - I_p|`` at the current
    colours. ``want_tex``: the colour is ``const + J . tex`` (``basis`` ``(M, 3, K)`` vertex-major); rows ``3 p + ch``
    of ``sqrt(u) J`` into ``jac_tex`` and of ``sqrt(u) (const - I)`` into ``res_tex``. Else per channel the colour is
    ``G . gamma_ch`` (ambient included): ``sum u G G^T`` (upper triangle) into ``h_light`` (3, 9, 9), ``sum u G I``
    into ``rhs_light``."""
    bc = np.empty(3)
    vs = np.empty((3, 3))
    gl = np.empty(9)
    n_basis = basis.shape[2]
    for p in range(pix_tris.shape[0]):
        _ray_barycentrics(cam, pix_tris[p], rays[p, 0], rays[p, 1], vs, bc)
        sq = 0.0
        for ch in range(3):
            r = -target[p, ch]
            for m in range(3):
                r += bc[m] * color[pix_tris[p, m], ch]
            sq += r * r
        u = scale * weight[p] / math.sqrt(1e-6 + sq)
        su = math.sqrt(u)
        for ch in range(3):
            if want_tex:
                row = 3 * p + ch
                v0, v1, v2 = pix_tris[p, 0], pix_tris[p, 1], pix_tris[p, 2]
                f0, f1, f2 = bc[0] * shade[v0, ch], bc[1] * shade[v1, ch], bc[2] * shade[v2, ch]
                c0 = f0 * mean_albedo[v0, ch] + f1 * mean_albedo[v1, ch] + f2 * mean_albedo[v2, ch]
                f0, f1, f2 = f0 * su, f1 * su, f2 * su
                for q in range(n_basis):
                    jac_tex[row, q] = f0 * basis[v0, ch, q] + f1 * basis[v1, ch, q] + f2 * basis[v2, ch, q]
                res_tex[row] = su * (c0 - target[p, ch])
            else:
                gl[:] = 0.0
                for m in range(3):
                    v = pix_tris[p, m]
                    f = bc[m] * albedo[v, ch]
                    for q in range(9):
                        gl[q] += f * sh[v, q]
                for q in range(9):
                    ug = u * gl[q]
                    rhs_light[ch, q] += ug * target[p, ch]
                    for t in range(q, 9):  # the upper triangle; mirrored by the caller
                        h_light[ch, q, t] += ug * gl[t]


_GROUPS = ("id", "exp", "tex", "angle", "gamma", "trans")


class _State:
    """The parameters as float64 NumPy arrays (``id`` and ``tex`` one row when shared), the fused engine's copy of
    :class:`_Params`."""

    def __init__(self, params: _Params) -> None:
        self.share, self.nb = params.share, params.batch
        self.values = {k: getattr(params, k).detach().double().numpy().copy() for k in _GROUPS}

    def zeros(self) -> dict[str, np.ndarray]:
        return {k: np.zeros_like(v) for k, v in self.values.items()}

    def row(self, name: str, b: int) -> np.ndarray:
        return self.values[name][0 if self.share and name in ("id", "tex") else b]

    def geo(self, b: int) -> np.ndarray:
        return np.concatenate([self.row("id", b), self.values["exp"][b]])

    def write(self, params: _Params) -> None:
        with torch.no_grad():
            for k, v in self.values.items():
                getattr(params, k).copy_(torch.from_numpy(v))


class _NpAdam:
    """:class:`facerecon.adam.Adam`'s update (``torch.optim.Adam``'s defaults) on :class:`_State`'s arrays."""

    def __init__(self, groups: list[tuple[tuple[str, ...], float]], beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        self.groups, self.beta1, self.beta2, self.eps = groups, beta1, beta2, eps
        self.moments: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.count = 0

    def step(self, state: _State, grads: dict[str, np.ndarray]) -> None:
        self.count += 1
        c1, c2 = 1.0 - self.beta1**self.count, math.sqrt(1.0 - self.beta2**self.count)
        for names, lr in self.groups:
            for k in names:
                g = grads[k]
                if k not in self.moments:
                    self.moments[k] = (np.zeros_like(g), np.zeros_like(g))
                m, v = self.moments[k]
                m += (1.0 - self.beta1) * (g - m)
                v *= self.beta2
                v += (1.0 - self.beta2) * g * g
                state.values[k] -= (lr / c1) * m / (np.sqrt(v) / c2 + self.eps)


class _FusedObjective:
    """The fit's objective with hand-written gradients on a face model's face region (module docstring); built once
    per face model (:meth:`of`) and kept: the gathered bases are the buffers every fit reuses."""

    _cache: ClassVar[weakref.WeakKeyDictionary[torch.nn.Module, _FusedObjective]] = weakref.WeakKeyDictionary()
    _lock: ClassVar[threading.Lock] = threading.Lock()
    key: tuple[int, ...] = ()

    @classmethod
    def of(cls, decoder: FaceDecoder) -> _FusedObjective:
        m = decoder.model
        key = (m.id_basis.data_ptr(), m.exp_basis.data_ptr(), m.albedo_basis.data_ptr(), m.mean_shape.data_ptr(),
               hash(decoder.camera))
        with cls._lock:
            obj = cls._cache.get(m)
            if obj is None or obj.key != key:
                obj = cls(decoder)
                obj.key = key
                cls._cache[m] = obj
        return obj

    def __init__(self, decoder: FaceDecoder) -> None:
        m = decoder.model
        self.camera, self.distance = decoder.camera, float(decoder.camera.distance)
        self.k_id = m.layout.id
        tri = m.triangles.numpy()
        n_tri = tri.shape[0]
        face = m.face_mask.numpy()
        touch = face[tri].any(axis=1)  # a pixel is in the region only on a triangle with a face_mask vertex
        used = np.unique(tri[touch])
        pb = m.point_buf.numpy()
        inc = np.unique(pb[used])
        inc = inc[inc < n_tri]
        verts = np.concatenate([used, np.setdiff1d(np.unique(tri[inc]), used)])  # the face first, then its ring
        local = np.full(m.n_vertices, -1, np.int64)
        local[verts] = np.arange(verts.size)
        tri_local = np.full(n_tri + 1, inc.size, np.int64)
        tri_local[inc] = np.arange(inc.size)
        self.n_face, self.n_ring = used.size, verts.size
        self.tris = np.ascontiguousarray(local[tri[inc]])
        self.pb = np.ascontiguousarray(tri_local[pb[used]])
        self.raster_tris = np.ascontiguousarray(local[tri[touch]])
        self.touch = touch
        self.face_mask = face[used].astype(np.float64)

        def cols(v: np.ndarray) -> Tensor:
            return torch.from_numpy((v[:, None] * 3 + np.arange(3)).reshape(-1))

        shape_basis = torch.cat([m.id_basis, m.exp_basis])
        self.shape_basis = shape_basis[:, cols(verts)].contiguous()
        self.mean_shape = m.mean_shape[torch.from_numpy(verts)].double().numpy()
        self.albedo_basis = m.albedo_basis[:, cols(used)].contiguous()
        self.albedo_basis_vm = self.albedo_basis.double().view(-1, used.size, 3).permute(1, 2, 0).contiguous().numpy()
        self.mean_albedo = m.mean_albedo[torch.from_numpy(used)].double().numpy()
        lm = m.landmarks68.numpy()
        self.lm_basis = shape_basis[:, cols(lm)].double().numpy().copy()
        self.lm_mean = m.mean_shape[m.landmarks68].double().numpy().copy()
        q_mat, q_vec, self.refl_c0 = _reflectance_quadratic(m)  # albedo flatness, a quadratic in tex
        self.refl_q, self.refl_a = q_mat.numpy(), q_vec.numpy()
        self.n_skin = int(m.skin_mask.sum())
        # the whole mesh, for the occlusion raster
        self.model = m
        self.triangles = tri

    # -- the terms both stages share --------------------------------------------------------------------------
    def pose(self, st: _State, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        angle = st.values["angle"][b]
        return rotation(angle), rotation_derivatives(angle), st.values["trans"][b]

    def landmarks(self, geo: np.ndarray, rot: np.ndarray, trans: np.ndarray, target: np.ndarray,
                  weight: np.ndarray, scale: float, g_geo: np.ndarray, g_rot: np.ndarray, g_trans: np.ndarray) -> float:
        intr = self.camera.intrinsics
        return _landmark_kernel(geo, self.lm_mean, self.lm_basis, rot, trans, target, weight, intr.fx, intr.fy,
                                intr.cx, intr.cy, self.distance, scale, g_geo, g_rot, g_trans, np.empty((68, 3)),
                                np.empty((68, 3)))

    def priors(self, st: _State, w: losses.LossWeights, grads: dict[str, np.ndarray], photometric: bool = True
               ) -> dict[str, float]:
        """The coefficient prior, and in the photometric stage albedo flatness and the gamma prior (the rest of
        ``hybrid_terms``): values (unweighted, as :class:`~facerecon.objective.Terms`) and weighted gradients."""
        v, nb = st.values, st.nb
        rep = nb if st.share else 1  # a shared row counts once per image, then / B
        coef = (w.coef_id * rep * (v["id"] ** 2).sum() + w.coef_exp * (v["exp"] ** 2).sum()
                + w.coef_tex * rep * (v["tex"] ** 2).sum()) / nb
        grads["id"] += (w.coef * 2.0 * w.coef_id * rep / nb) * v["id"]
        grads["exp"] += (w.coef * 2.0 * w.coef_exp / nb) * v["exp"]
        if not photometric:
            return {"coef": float(coef)}
        grads["tex"] += (w.coef * 2.0 * w.coef_tex * rep / nb) * v["tex"]
        tex = v["tex"]
        qt = tex @ self.refl_q
        refl = rep * (self.refl_c0 * tex.shape[0] + 2.0 * (tex @ self.refl_a).sum() + (qt * tex).sum())
        refl /= nb * self.n_skin
        grads["tex"] += (w.reflectance * 2.0 * rep / (nb * self.n_skin)) * (qt + self.refl_a)
        g = v["gamma"].reshape(nb, 3, 9)
        dev = g - g.mean(axis=1, keepdims=True)
        grads["gamma"] += (w.gamma * 2.0 / (nb * 27)) * dev.reshape(nb, 27)
        return {"coef": float(coef), "reflectance": float(refl), "gamma": float((dev**2).mean())}

    def add_pose_grads(self, grads: dict[str, np.ndarray], b: int, d_rot: np.ndarray, g_rot: np.ndarray,
                       g_trans: np.ndarray) -> None:
        grads["angle"][b] += (d_rot * g_rot[None]).sum(axis=(1, 2))
        grads["trans"][b] += g_trans

    def add_geo_grads(self, st: _State, grads: dict[str, np.ndarray], b: int, g_geo: np.ndarray) -> None:
        grads["id"][0 if st.share else b] += g_geo[: self.k_id]
        grads["exp"][b] += g_geo[self.k_id:]

    def landmark_step(self, st: _State, lm_target: np.ndarray, lm_weight: np.ndarray, w: losses.LossWeights
                      ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """``landmark_terms(...).total(w)`` (value and gradient)."""
        grads = st.zeros()
        total = 0.0
        for b in range(st.nb):
            rot, d_rot, trans = self.pose(st, b)
            g_geo, g_rot, g_trans = np.zeros(self.lm_basis.shape[0]), np.zeros((3, 3)), np.zeros(3)
            total += self.landmarks(st.geo(b), rot, trans, lm_target[b], lm_weight, w.landmark / (68 * st.nb), g_geo,
                                    g_rot, g_trans)
            self.add_pose_grads(grads, b, d_rot, g_rot, g_trans)
            self.add_geo_grads(st, grads, b, g_geo)
        coef = self.priors(st, w, grads, photometric=False)["coef"]
        return {"loss": total + w.coef * coef, "landmark": total / w.landmark if w.landmark else 0.0}, grads


def _landmark_weights(target: FitTarget) -> np.ndarray:
    w = losses.LANDMARK_WEIGHTS if target.landmark_weights is None else target.landmark_weights
    return w.detach().double().cpu().numpy()


class _PhotometricStage:
    """One photometric stage of the fused objective: the pooled photo and skin map, the visibility and the buffers."""

    def __init__(self, obj: _FusedObjective, st: _State, target: FitTarget, cfg: FitConfig) -> None:
        self.obj, self.st, self.cfg, self.w = obj, st, cfg, cfg.weights
        self.light_start = st.values["gamma"].copy()  # (B, 27): the light solves' ridge pulls towards it
        k = CROP // cfg.photo_size
        image = target.image.detach()
        skin = target.skin.detach() if target.skin is not None else torch.ones_like(image[:, :1])
        if k > 1:
            image, skin = torch.nn.functional.avg_pool2d(image, k), torch.nn.functional.avg_pool2d(skin, k)
        self.photo = image.double().flatten(2).numpy()  # (B, 3, S*S)
        self.skin = skin.double().flatten(2)[:, 0].numpy()  # (B, S*S)
        self.intr = obj.camera.intrinsics.scaled(cfg.photo_size / CROP)
        self.lm_target = target.landmarks.detach().double().numpy()
        self.lm_weight = _landmark_weights(target)
        m, m2, nt = obj.n_face, obj.n_ring, obj.tris.shape[0]
        self.bufs = [{"fn": np.empty((nt, 3)), "fnorm": np.empty(nt), "n": np.empty((m, 3)), "vnorm": np.empty(m),
                      "nw": np.empty((m, 3)), "sh": np.empty((m, 9)), "shade": np.empty((m, 3)),
                      "color": np.empty((m, 3)), "cam": np.empty((m, 3))} for _ in range(st.nb)]
        self.work = {"g_cam": np.empty((m, 3)), "g_color": np.empty((m, 3)), "g_s": np.empty((m2, 3)),
                     "g_albedo": np.empty((m, 3)), "g_fn": np.empty((nt, 3))}
        self.pixels: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.occluded = [self._occlusion(b) for b in range(st.nb)]

    def _occlusion(self, b: int) -> np.ndarray:
        """``(S*S,)`` bool: pixels where the whole mesh's nearest triangle is not one of the face's (the rest of the
        head in front of it), from the whole mesh's raster at the stage's start."""
        from facerecon.render.cpu import rasterize_arrays

        st, m = self.st, self.obj.model
        with torch.no_grad():
            geo = torch.from_numpy(st.geo(b)).float()
            k = self.obj.k_id
            shape = m.mean_shape + (geo[:k] @ m.id_basis + geo[k:] @ m.exp_basis).view(-1, 3)
            rot, _, trans = self.obj.pose(st, b)
            # (torch, not NumPy, for the products: NumPy's BLAS runs its own threads, costly on a busy machine)
            cam = (shape.double() @ torch.from_numpy(rot).T + torch.from_numpy(trans)).numpy()
        cam[:, 2] = self.obj.distance - cam[:, 2]
        tid = rasterize_arrays(cam, self.obj.triangles, self.intr)[0].reshape(-1)
        return (tid >= 0) & ~self.obj.touch[np.maximum(tid, 0)]

    def _select(self, b: int, cam: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        from facerecon.render.cpu import rasterize_arrays

        _, pix, pv, bary = rasterize_arrays(cam, self.obj.raster_tris, self.intr)
        i = self.intr
        return _select_kernel(pix, pv, bary, self.obj.face_mask, self.occluded[b], self.photo[b], self.skin[b],
                              self.cfg.photo_size, i.fx, i.fy, i.cx, i.cy)

    def _forward(self, refresh: bool) -> tuple[list[tuple], float]:
        """Shape, albedo, shading and camera positions of every image into its buffers (and the region's pixels
        when ``refresh``); returns each image's inputs to the backward and the photometric normaliser."""
        obj, st = self.obj, self.st
        refresh = refresh or not self.pixels
        poses = []
        for b in range(st.nb):
            geo = st.geo(b)
            s = obj.mean_shape + (torch.from_numpy(geo).float() @ obj.shape_basis).view(-1, 3).numpy()
            tex = torch.from_numpy(st.row("tex", b)).float()
            albedo = obj.mean_albedo + (tex @ obj.albedo_basis).view(-1, 3).numpy()
            gam = st.values["gamma"][b].reshape(3, 9).copy()
            gam[:, 0] += INIT_LIGHT
            rot, d_rot, trans = obj.pose(st, b)
            buf = self.bufs[b]
            _shade_forward(s, obj.tris, obj.pb, rot, trans, albedo, gam, obj.distance, buf["fn"], buf["fnorm"],
                           buf["n"], buf["vnorm"], buf["nw"], buf["sh"], buf["shade"], buf["color"], buf["cam"])
            poses.append((geo, s, albedo, gam, rot, d_rot, trans))
            if refresh:
                if len(self.pixels) <= b:
                    self.pixels.append(self._select(b, buf["cam"]))
                else:
                    self.pixels[b] = self._select(b, buf["cam"])
        return poses, max(sum(float(px[3].sum()) for px in self.pixels), 1.0)

    def step(self, step: int, solve: bool = False) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """The photometric stage's total loss (``hybrid_terms(...).total(w)``) and its gradient; with ``solve``,
        light and albedo are first solved for with the rest fixed (:meth:`_solve_appearance`)."""
        obj, st, w = self.obj, self.st, self.w
        grads = st.zeros()
        poses, norm = self._forward(step % self.cfg.refresh_every == 0)
        if solve:
            self._solve_appearance(poses, norm)
        photo = landmark = 0.0
        wk = self.work
        for b in range(st.nb):
            geo, s, albedo, gam, rot, d_rot, trans = poses[b]
            buf, (pv, rays, colours, weight) = self.bufs[b], self.pixels[b]
            for key in ("g_cam", "g_color", "g_s", "g_albedo"):
                wk[key].fill(0.0)
            photo += _photo_kernel(buf["cam"], buf["color"], pv, rays, colours, weight, w.photo / norm,
                                   wk["g_cam"], wk["g_color"]) / norm
            g_rot, g_trans, g_gam = np.zeros((3, 3)), np.zeros(3), np.zeros((3, 9))
            _shade_backward(wk["g_cam"], wk["g_color"], s, obj.tris, obj.pb, rot, albedo, gam, buf["fn"],
                            buf["fnorm"], buf["n"], buf["vnorm"], buf["sh"], buf["shade"], wk["g_s"], g_rot, g_trans,
                            wk["g_albedo"], g_gam, wk["g_fn"])
            g_geo = (obj.shape_basis @ torch.from_numpy(wk["g_s"].reshape(-1)).float()).double().numpy()
            landmark += obj.landmarks(geo, rot, trans, self.lm_target[b], self.lm_weight, w.landmark / (68 * st.nb),
                                      g_geo, g_rot, g_trans)
            obj.add_geo_grads(st, grads, b, g_geo)
            obj.add_pose_grads(grads, b, d_rot, g_rot, g_trans)
            g_tex = obj.albedo_basis @ torch.from_numpy(wk["g_albedo"].reshape(-1)).float()
            grads["tex"][0 if st.share else b] += g_tex.double().numpy()
            grads["gamma"][b] += g_gam.reshape(-1)
        pri = obj.priors(st, w, grads)
        total = (w.photo * photo + landmark + w.coef * pri["coef"] + w.reflectance * pri["reflectance"]
                 + w.gamma * pri["gamma"])
        return {"loss": total, "photo": photo, "landmark": landmark / w.landmark if w.landmark else 0.0}, grads

    def _solve_appearance(self, poses: list[tuple], norm: float) -> None:
        """Light, then albedo, each set to the minimum with everything else fixed of the L2,1 term's
        iteratively-reweighted quadratic majoriser (weights ``m_p / (M |r_p|)`` at the current residuals) plus the
        quadratic priors on it (coefficient, albedo flatness, gamma): exact block steps that never raise the loss
        (the colours are linear in either given the other). Updates the buffers' shading and colours."""
        obj, st, w = self.obj, self.st, self.w
        nb, rep = st.nb, (st.nb if st.share else 1)
        k_tex = obj.albedo_basis_vm.shape[2]
        prior = (2.0 * w.gamma / (27 * nb)) * np.kron(np.eye(3) - 1.0 / 3.0, np.eye(9))
        scale = w.photo / norm
        no_tex, no_res = np.empty((0, k_tex), np.float32), np.empty(0, np.float32)
        for b in range(nb):  # light, per image
            buf, (pv, rays, colours, weight) = self.bufs[b], self.pixels[b]
            h, rhs = np.zeros((3, 9, 9)), np.zeros((3, 9))
            _appearance_system(buf["cam"], buf["color"], buf["shade"], poses[b][2], obj.mean_albedo,
                               obj.albedo_basis_vm, buf["sh"], pv, rays, colours, weight, scale, False, no_tex,
                               no_res, h, rhs)
            a = prior.copy()
            for ch in range(3):
                a[ch * 9:(ch + 1) * 9, ch * 9:(ch + 1) * 9] += np.triu(h[ch]) + np.triu(h[ch], 1).T
            start = self.light_start[b].reshape(3, 9).copy()
            start[:, 0] += INIT_LIGHT
            mu = _light_prior(a, self.cfg.light_prior)
            gam = np.linalg.solve(a + mu * np.eye(27), rhs.reshape(-1) + mu * start.reshape(-1)).reshape(3, 9)
            buf["shade"][:] = (torch.from_numpy(buf["sh"]) @ torch.from_numpy(gam).T).numpy()
            np.multiply(poses[b][2], buf["shade"], out=buf["color"])
            gam[:, 0] -= INIT_LIGHT
            st.values["gamma"][b] = gam.reshape(-1)
        systems: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for b in range(nb):  # albedo, per image or shared
            buf, (pv, rays, colours, weight) = self.bufs[b], self.pixels[b]
            jac, res = np.empty((3 * pv.shape[0], k_tex), np.float32), np.empty(3 * pv.shape[0], np.float32)
            _appearance_system(buf["cam"], buf["color"], buf["shade"], poses[b][2], obj.mean_albedo,
                               obj.albedo_basis_vm, buf["sh"], pv, rays, colours, weight, scale, True, jac, res,
                               np.empty((0, 9, 9)), np.empty((0, 9)))
            jt = torch.from_numpy(jac)
            h, g = (jt.T @ jt).double().numpy(), (jt.T @ torch.from_numpy(res)).double().numpy()
            row = 0 if st.share else b
            h0, g0 = systems.get(row, (0.0, 0.0))
            systems[row] = (h0 + h, g0 + g)
        refl = 2.0 * w.reflectance * rep / (nb * obj.n_skin)
        for row, (h, g) in systems.items():
            h = h + (2.0 * w.coef * w.coef_tex * rep / nb) * np.eye(k_tex) + refl * obj.refl_q
            st.values["tex"][row] = np.linalg.solve(h, -(g + refl * obj.refl_a))
        for b in range(nb):
            tex = torch.from_numpy(st.row("tex", b)).float()
            albedo = obj.mean_albedo + (tex @ obj.albedo_basis).view(-1, 3).numpy()
            np.multiply(albedo, self.bufs[b]["shade"], out=self.bufs[b]["color"])
            gam = st.values["gamma"][b].reshape(3, 9).copy()
            gam[:, 0] += INIT_LIGHT
            poses[b] = (*poses[b][:2], albedo, gam, *poses[b][4:])


def _fit_fused(obj: _FusedObjective, params: _Params, target: FitTarget, cfg: FitConfig, photometric: bool,
               history: list[dict[str, float]]) -> None:
    """Both stages on the fused objective (the same schedule as the autograd loop of :func:`fit`); the result is
    written into ``params``."""
    st = _State(params)
    lm_target, lm_weight = target.landmarks.detach().double().cpu().numpy(), _landmark_weights(target)
    opt = _NpAdam([(("angle", "trans"), cfg.lr_pose), (("id", "exp"), cfg.lr_shape)])
    stall = _Stall(cfg.stall_steps, cfg.stall_tol)
    for _ in range(cfg.landmark_steps):
        terms, grads = obj.landmark_step(st, lm_target, lm_weight, cfg.weights)
        opt.step(st, grads)
        history.append({"stage": 1.0, **terms})
        if stall.stalled(terms["loss"]):
            break
    if photometric:
        stage = _PhotometricStage(obj, st, target, cfg)
        opt = _NpAdam([(("angle", "trans"), cfg.lr_pose * 0.3), (("id", "exp"), cfg.lr_shape),
                       (("tex",), cfg.lr_albedo), (("gamma",), cfg.lr_light)])
        stall = _Stall(cfg.stall_steps, cfg.stall_tol)
        for step in range(cfg.photo_steps):
            terms, grads = stage.step(step, _solves(cfg, step))
            opt.step(st, grads)
            history.append({"stage": 2.0, **terms, "step": float(step)})
            if stall.stalled(terms["loss"]):
                break
    st.write(params)



def warmup() -> float:
    """Compile (or load from numba's on-disk cache) the fused engine's kernels on a one-triangle problem, so the
    first fit does not pay for it (``python -m facerecon.warmup`` at install time); returns the seconds it took."""
    start = time.perf_counter()
    s = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0]])
    tris = np.array([[0, 1, 2]], np.int64)
    pb = np.array([[0, 1], [0, 1], [0, 1]], np.int64)  # 1 = the padding triangle
    rot = rotation(np.zeros(3))
    trans, gam, albedo = np.zeros(3), np.full((3, 9), 0.1), np.full((3, 3), 0.5)
    fn, fnorm, n, vnorm = np.empty((1, 3)), np.empty(1), np.empty((3, 3)), np.empty(3)
    nw, sh, shade, color, cam = np.empty((3, 3)), np.empty((3, 9)), np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3))
    _shade_forward(s, tris, pb, rot, trans, albedo, gam, 10.0, fn, fnorm, n, vnorm, nw, sh, shade, color, cam)
    pix, rays, target, weight = tris.copy(), np.full((1, 2), 0.003), np.full((1, 3), 0.4), np.ones(1)
    g_cam, g_color, g_s = np.zeros((3, 3)), np.zeros((3, 3)), np.zeros((3, 3))
    _photo_kernel(cam, color, pix, rays, target, weight, 1.0, g_cam, g_color)
    _shade_backward(g_cam, g_color, s, tris, pb, rot, albedo, gam, fn, fnorm, n, vnorm, sh, shade, g_s,
                    np.zeros((3, 3)), np.zeros(3), np.zeros((3, 3)), np.zeros((3, 9)), np.zeros((1, 3)))
    basis = np.zeros((3, 3, 2))
    _appearance_system(cam, color, shade, albedo, albedo, basis, sh, pix, rays, target, weight, 1.0, True,
                       np.empty((3, 2), np.float32), np.empty(3, np.float32), np.empty((0, 9, 9)), np.empty((0, 9)))
    _appearance_system(cam, color, shade, albedo, albedo, basis, sh, pix, rays, target, weight, 1.0, False,
                       np.empty((0, 2), np.float32), np.empty(0, np.float32), np.zeros((3, 9, 9)), np.zeros((3, 9)))
    lm = np.zeros((68, 3))
    _landmark_kernel(np.zeros(2), lm, np.zeros((2, 204)), rot, trans, np.zeros((68, 2)), np.ones(68), 1015.0,
                     1015.0, 112.0, 112.0, 10.0, 1.0, np.zeros(2), np.zeros((3, 3)), np.zeros(3), np.empty((68, 3)),
                     np.empty((68, 3)))
    _select_kernel(np.zeros(1, np.int64), pix, np.full((1, 3), 1 / 3), np.ones(3), np.zeros(4, np.bool_),
                   np.zeros((3, 4)), np.ones(4), 2, 1015.0, 1015.0, 1.0, 1.0)
    from facerecon.geometry import Intrinsics
    from facerecon.render.cpu import rasterize_arrays

    rasterize_arrays(s + np.array([0.0, 0.0, 10.0]), tris, Intrinsics(1015.0, 1015.0, 2.0, 2.0, 4, 4))  # float64
    elapsed = time.perf_counter() - start
    log.debug("fit kernels ready in %.3f s", elapsed)
    return elapsed

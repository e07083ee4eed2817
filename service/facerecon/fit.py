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

* ``"fused"`` (the default on the CPU): the objective and its gradient written out in NumPy/numba, no autograd and
  no torch (:mod:`facerecon.fused`, which the pipeline also calls directly on NumPy arrays, so a CPU fit never
  imports torch); here :func:`fit` hands it the tensors' arrays and takes its result back.
  ``tests/test_fit.py`` checks its loss and gradient against autograd through ``hybrid_terms`` (equal but for the
  occluding head parts, which are held from the stage's start) and its solve against the autograd engine's.
* ``"autograd"``: ``hybrid_terms`` through :meth:`Renderer.rasterize` with torch autograd (any renderer, any
  device: nvdiffrast on a GPU); its solves interpolate the colour's light and albedo Jacobians with the renderer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from facerecon import fused
from facerecon.adam import Adam
from facerecon.coefficients import Coefficients
from facerecon.decoder import FaceDecoder
from facerecon.fitconfig import CROP, Engine, FitConfig, FitResult, Stall, light_prior, solves
from facerecon.geometry import INIT_LIGHT, Camera
from facerecon.geometry import sh_basis as geometry_sh
from facerecon.objective import hybrid_terms, landmark_terms
from facerecon.render.base import Renderer

__all__ = ["Engine", "FitConfig", "FitResult", "FitTarget", "fit", "fused_objective", "landmark_error"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitTarget:
    """What the fit matches, for a batch of B aligned crops.

    Attributes:
        image: ``(B, 3, 224, 224)`` float32 RGB in [0, 1].
        landmarks: ``(B, 68, 2)`` crop pixels, y up (the detector's 68 points mapped with the alignment).
        skin: ``(B, 1, 224, 224)`` skin attention in [0, 1] (:func:`facerecon.skin.skin_attention`), or None for 1.
        landmark_weights: ``(68,)`` or ``(B, 68)`` per face, or None for the reference weights.
    """

    image: Tensor
    landmarks: Tensor
    skin: Tensor | None = None
    landmark_weights: Tensor | None = None


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
        _fit_fused(fused_objective(decoder), params, target, cfg, photometric, history)
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
    stall = Stall(cfg.stall_steps, cfg.stall_tol)
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
    stall = Stall(cfg.stall_steps, cfg.stall_tol)
    skin = target.skin if target.skin is not None else torch.ones_like(target.image[:, :1])
    light_start = params.gamma.detach().clone()
    for step in range(cfg.photo_steps):
        if solves(cfg, step):
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


@torch.no_grad()
def _solve_appearance_autograd(decoder: FaceDecoder, renderer: Renderer, params: _Params, target: FitTarget,
                               skin: Tensor, cfg: FitConfig, light_start: Tensor | None = None) -> None:
    """The light and albedo block steps of the fused engine
    (:meth:`facerecon.fused.PhotometricStage._solve_appearance`) through any renderer: the colour's derivatives
    with respect to the light and albedo coefficients are per-vertex attributes, interpolated with the renderer like
    the colour. The region and weights are ``hybrid_terms``';
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
        mu = light_prior(a, cfg.light_prior)
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
    q, a, _ = fused.reflectance_quadratic(m.mean_albedo.cpu().numpy(), m.albedo_basis.cpu().numpy(),
                                          m.skin_mask.cpu().numpy())  # albedo flatness, a quadratic in tex
    q_mat, q_vec = torch.from_numpy(q), torch.from_numpy(a)
    eye = torch.eye(k_tex, dtype=h.dtype, device=h.device)
    h = h + (2.0 * w.coef * w.coef_tex * rep / nb) * eye + refl * q_mat.to(h)
    params.tex.copy_(torch.linalg.solve(h, -(rhs + refl * q_vec.to(h))).to(params.tex))


def fused_objective(decoder: FaceDecoder) -> fused.FusedObjective:
    """The fused engine's objective for ``decoder``'s face model and camera, built once and kept (rebuilt when the
    model's buffers are replaced or moved)."""
    m = decoder.model
    key = (m.id_basis.data_ptr(), m.exp_basis.data_ptr(), m.albedo_basis.data_ptr(), m.mean_shape.data_ptr(),
           hash(decoder.camera))

    def build() -> tuple[dict[str, np.ndarray], int, Camera]:
        return {k: getattr(m, k).detach().cpu().numpy() for k in fused.MODEL_ARRAYS}, m.layout.id, decoder.camera

    return fused.FusedObjective.cached(m, key, build=build)


def fused_target(target: FitTarget) -> fused.FusedTarget:
    """``target``'s arrays for the fused engine."""
    def arr(t: Tensor | None) -> np.ndarray | None:
        return None if t is None else t.detach().cpu().numpy()

    return fused.FusedTarget(arr(target.image), arr(target.landmarks), arr(target.skin),  # type: ignore[arg-type]
                             arr(target.landmark_weights))


def _fit_fused(obj: fused.FusedObjective, params: _Params, target: FitTarget, cfg: FitConfig, photometric: bool,
               history: list[dict[str, float]]) -> None:
    """Both stages on the fused engine (:func:`facerecon.fused.fit_arrays`, the same schedule as the autograd loop
    of :func:`fit`); the result is written into ``params``."""
    start = {k: getattr(params, k).detach().double().numpy() for k in _GROUPS}
    values = fused.fit_arrays(obj, start, params.share, fused_target(target), cfg, photometric, history)
    with torch.no_grad():
        for k, v in values.items():
            getattr(params, k).copy_(torch.from_numpy(v))


_GROUPS = ("id", "exp", "tex", "angle", "gamma", "trans")

"""The test-time fit's settings (:class:`FitConfig`) and the small rules both of its engines share: early stopping
(:class:`Stall`), the light solve's ridge (:func:`light_prior`) and the solve schedule (:func:`solves`). Torch-free:
the fused engine (:mod:`facerecon.fused`) runs a whole fit without importing torch; :mod:`facerecon.fit` (torch's
autograd engine and the tensor interface) re-exports :class:`FitConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from facerecon.align import CROP_SIZE as CROP
from facerecon.weights import LossWeights

if TYPE_CHECKING:
    from facerecon.coefficients import Coefficients

__all__ = ["CROP", "Engine", "FitConfig", "FitResult", "Stall", "light_prior", "solves"]

Engine = Literal["auto", "fused", "autograd"]


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
    weights: LossWeights = field(default_factory=lambda: LossWeights(coef=3.0e-3))

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
    """A fit's outcome: the fitted coefficients (detached; NumPy from the torch-free engine), the per-image landmark
    error (crop px) before and after, the loss history (one entry per step: ``stage`` 1 or 2, ``loss``,
    ``landmark``, and ``photo`` in stage 2) and the seconds it took."""

    coefficients: Coefficients
    landmark_error_start: list[float]
    landmark_error_end: list[float]
    history: list[dict[str, float]]
    seconds: float


class Stall:
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


def light_prior(a: Any, rel: float) -> float:
    """The light solve's ridge weight (towards the light the photometric stage started from): ``rel`` times the
    mean diagonal of the solve's system ``a`` (so it scales with the photo's evidence, not with its pixel count)."""
    return rel * float(a.diagonal().sum()) / a.shape[0]


def solves(cfg: FitConfig, step: int) -> bool:
    """Whether photometric ``step`` starts with the light and albedo solve."""
    return bool(cfg.appearance_every) and step % cfg.appearance_every == 0

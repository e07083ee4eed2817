"""The one entry point: photo(s) -> reconstruction(s). The CLI and the HTTP app are thin shells over this.

``bytes/array -> faces (detect) -> aligned 224 crop (align) -> coefficients (R-Net and/or fitting) -> decoded face
(decoder) -> render/overlay (render) -> exports (export)``. Each stage is timed (milliseconds, in
``Reconstruction.timings``).

Modes: with a trained R-Net installed for the face model (``models/<name>/rnet.json``), R-Net predicts and
``refine`` adds test-time fitting from its prediction; without one, fitting from the mean face is the quality path
(the alignment already places the mean face on the photo) and this is said at start-up, never silently.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from facerecon import __version__
from facerecon.align import Alignment, align_face
from facerecon.coefficients import Coefficients
from facerecon.config import Settings, get_settings
from facerecon.decoder import DecodedFace, FaceDecoder
from facerecon.detect import DetectedFace, FaceDetector, select_faces
from facerecon.errors import NoFaceFound, TooManyImages
from facerecon.export import MeshData, MeshFormat, export_mesh
from facerecon.facemodel import FaceModel
from facerecon.facemodel.registry import resolve
from facerecon.fit import FitConfig, FitTarget, fit
from facerecon.nets.cnet import aggregate
from facerecon.nets.runtime import OnnxNet, check_pair
from facerecon.render import get_renderer
from facerecon.render.base import Renderer
from facerecon.render.overlay import overlay_on_photo, shaded_geometry
from facerecon.skin import REFERENCE_GMM, skin_attention

log = logging.getLogger(__name__)

Which = Literal["largest", "all"]


@dataclass
class Reconstruction:
    """One reconstructed face.

    Attributes:
        face: the detection (box, 5 and 68 landmarks in photo pixels, y down).
        alignment: the 224-crop transform (:meth:`Alignment.to_photo` maps crop points back).
        crop: ``(224, 224, 3)`` uint8 RGB aligned crop.
        coefficients: batch of one.
        decoded: batch of one.
        landmarks_photo: ``(68, 2)`` float, the reconstruction's 68 landmarks reprojected into the photo (pixels,
            y down, integer = pixel centre).
        mode: ``"rnet"``, ``"rnet+fit"`` or ``"fit"``.
        landmark_error_px: mean distance (crop px) between the reprojected and the detected 68 landmarks.
        timings: stage -> milliseconds.
    """

    face: DetectedFace
    alignment: Alignment
    crop: np.ndarray
    coefficients: Coefficients
    decoded: DecodedFace
    landmarks_photo: np.ndarray
    mode: str
    landmark_error_px: float
    timings: dict[str, float] = field(default_factory=dict)
    photo_size: tuple[int, int] = (0, 0)

    def pose_degrees(self) -> dict[str, float]:
        pitch, yaw, roll = np.degrees(self.coefficients.angle[0].detach().cpu().numpy()).tolist()
        return {"pitch": pitch, "yaw": yaw, "roll": roll}


@dataclass
class SetReconstruction:
    """An image set of one person: one identity/albedo, per-image pose, expression and lighting."""

    items: list[Reconstruction]
    identity: Coefficients  # batch of one: aggregated id/tex, zero expression, frontal, ambient light
    aggregation: str
    timings: dict[str, float] = field(default_factory=dict)


def _load_networks(settings: Settings, model: FaceModel) -> tuple[OnnxNet | None, OnnxNet | None]:
    """The R-Net (and C-Net) installed beside the face model, or None when there is no ``rnet.json``.

    A card that exists but whose network is missing, corrupt or for another face model is a start-up error
    (:class:`ModelFileError`), never a silent fallback.
    """
    npz = resolve(settings.models_dir, settings.face_model)
    nets: list[OnnxNet | None] = []
    for kind in ("rnet", "cnet"):
        card = npz.parent / f"{kind}.json"
        if not settings.use_networks or not card.is_file():
            nets.append(None)
            continue
        nets.append(OnnxNet.for_face_model(npz, kind, device=settings.device))  # type: ignore[arg-type]
    rnet, cnet = nets
    if rnet is None and cnet is not None:
        log.warning("a C-Net without an R-Net is unused")
        cnet = None
    if rnet is not None and cnet is not None:
        check_pair(rnet, cnet)
    return rnet, cnet


def _net_info(net: OnnxNet | None) -> dict[str, Any] | None:
    if net is None:
        return None
    return {"card": net.card.model_dump(mode="json"), "providers": net.providers}


def _overlay_triangles(model: FaceModel) -> torch.Tensor:
    """The triangles drawn over a photo: the photometric face region plus the eyes and the inner mouth (the scalp,
    neck and back of the head would paint over hair and collar)."""
    keep = model.face_mask.clone()
    region = model.extras.get("vertex_region")
    if region is not None:
        names = model.card.regions
        inner = [v for k, v in names.items() if k.startswith(("eyeball", "eye_socket", "mouth_socket"))]
        keep |= torch.from_numpy(np.isin(region, inner)).to(keep.device)
    tris = model.triangles
    return tris[keep[tris].all(dim=1)]


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - t0) * 1000.0


class Reconstructor:
    """Holds the loaded models once; thread-safe for concurrent calls (the torch parts run under one lock)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        face_model: FaceModel | None = None,
        detector: FaceDetector | None = None,
        renderer: Renderer | None = None,
        fit_config: FitConfig | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        if self.settings.torch_threads > 0:
            # Multi-threaded CPU reductions and scatters sum in a varying order; over a few dozen optimiser steps
            # that moves a fit by ~1 %. One thread makes every reconstruction bit-reproducible (requests run
            # concurrently in the service's workers instead).
            torch.set_num_threads(self.settings.torch_threads)
        device = self.settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = face_model or FaceModel.from_file(
            resolve(self.settings.models_dir, self.settings.face_model), device=self.device
        )
        self.decoder = FaceDecoder(self.model)
        self.detector = detector or FaceDetector()
        self.renderer = renderer or get_renderer(self.settings.renderer, self.device)
        self.fit_config = fit_config or FitConfig()
        self.lm3d5 = self.model.standard_lm5
        self.overlay_triangles = _overlay_triangles(self.model)
        self.rnet, self.cnet = _load_networks(self.settings, self.model)
        self._lock = threading.Lock()
        log.info(
            "reconstructor ready: face model %s, device %s, renderer %s, R-Net %s",
            self.model.name, self.device, self.renderer.name,
            "installed" if self.rnet is not None else "not installed (test-time fitting from the mean face)",
        )

    # -- information -------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "face_model": self.model.card.model_dump(mode="json"),
            "device": str(self.device),
            "renderer": self.renderer.name,
            "rnet": _net_info(self.rnet),
            "cnet": _net_info(self.cnet),
            "default_mode": "rnet+fit" if self.rnet is not None else "fit",
        }

    # -- stages ------------------------------------------------------------------------------------------------
    def detect(self, image: np.ndarray, which: Which = "largest") -> list[DetectedFace]:
        faces = select_faces(self.detector.detect(image, which), which)
        if not faces:
            raise NoFaceFound("no face found in the photo")
        return faces

    def _prepare(self, image: np.ndarray, face: DetectedFace, timings: dict[str, float]) -> tuple[
        np.ndarray, Alignment, np.ndarray, np.ndarray
    ]:
        with _timed(timings, "align"):
            try:
                yaw = face.pose[1] if face.pose is not None else None
                crop, alignment, _ = align_face(image, face.lm5, self.lm3d5, lm68_photo=face.lm68, yaw_degrees=yaw)
            except ValueError as exc:  # degenerate 5 points, or a face too small to resize to the crop
                raise NoFaceFound(f"the face found cannot be aligned: {exc}") from exc
            lm68_crop = alignment.to_crop(face.lm68)
        with _timed(timings, "skin"):
            skin = REFERENCE_GMM.probability(crop)
        return crop, alignment, lm68_crop, skin

    def _targets(self, crops: Sequence[np.ndarray], lms: Sequence[np.ndarray], skins: Sequence[np.ndarray]
                 ) -> FitTarget:
        image = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255.0).to(self.device)
        lm = torch.from_numpy(np.stack(lms)).float().to(self.device)
        skin = skin_attention(torch.from_numpy(np.stack(skins))[:, None].float()).to(self.device)
        return FitTarget(image=image, landmarks=lm, skin=skin)

    def _finish(self, image: np.ndarray, face: DetectedFace, alignment: Alignment, crop: np.ndarray,
                coeffs: Coefficients, mode: str, lm68_crop: np.ndarray, timings: dict[str, float]
                ) -> Reconstruction:
        with _timed(timings, "decode"), torch.no_grad():
            decoded = self.decoder(coeffs)
        lm_crop = decoded.landmarks_2d[0].cpu().numpy().astype(np.float64)
        err = float(np.linalg.norm(lm_crop - lm68_crop, axis=1).mean())
        return Reconstruction(
            face=face, alignment=alignment, crop=crop, coefficients=coeffs, decoded=decoded,
            landmarks_photo=alignment.to_photo(lm_crop), mode=mode, landmark_error_px=err, timings=timings,
            photo_size=(int(image.shape[1]), int(image.shape[0])),
        )

    # -- one photo ---------------------------------------------------------------------------------------------
    def reconstruct(self, image: np.ndarray, *, which: Which = "largest", refine: bool | None = None
                    ) -> list[Reconstruction]:
        """Reconstruct the largest face (or all faces) of one RGB photo ``(H, W, 3) uint8``.

        Raises:
            NoFaceFound: no face in the photo.
        """
        timings: dict[str, float] = {}
        with _timed(timings, "detect"):
            faces = self.detect(image, which)
        out = []
        for face in faces:
            t = dict(timings)
            crop, alignment, lm68_crop, skin = self._prepare(image, face, t)
            target = self._targets([crop], [lm68_crop], [skin])
            with self._lock:
                coeffs, mode = self._coefficients(target, refine, t)
            out.append(self._finish(image, face, alignment, crop, coeffs, mode, lm68_crop, t))
        return out

    def _coefficients(self, target: FitTarget, refine: bool | None, timings: dict[str, float],
                      share_identity: bool = False) -> tuple[Coefficients, str]:
        init = None
        mode = "fit"
        if self.rnet is not None:
            with _timed(timings, "rnet"):
                vec = torch.from_numpy(self.rnet.run(target.image.cpu().numpy())["coeffs"]).to(self.device)
                init = Coefficients.from_vector(vec, self.model.layout)
            mode = "rnet"
            if refine is None:
                refine = self.settings.refine
            if not refine:
                return init, mode
            mode = "rnet+fit"
        cfg = self.fit_config
        if share_identity != cfg.share_identity:
            cfg = FitConfig(**{**cfg.__dict__, "share_identity": share_identity})
        with _timed(timings, "fit"):
            result = fit(self.decoder, self.renderer, target, init=init, config=cfg)
        return result.coefficients, mode

    # -- a set of photos of one person -------------------------------------------------------------------------
    def reconstruct_set(self, images: Sequence[np.ndarray], *, refine: bool | None = None) -> SetReconstruction:
        """One identity from several photos of one person (largest face of each).

        Raises:
            TooManyImages: more photos than ``settings.max_set_images``.
            NoFaceFound: a photo without a face (the message names its position).
        """
        if len(images) > self.settings.max_set_images:
            raise TooManyImages(f"{len(images)} photos in a set; the limit is {self.settings.max_set_images}")
        if not images:
            raise TooManyImages("an image set needs at least one photo")
        timings: dict[str, float] = {}
        # Process the photos in a canonical order (by content digest), so the result does not depend on the
        # order they were given in (floating-point sums and the optimiser would otherwise drift slightly).
        order = sorted(range(len(images)), key=lambda k: hashlib.sha1(np.ascontiguousarray(images[k])).digest())
        given = list(images)
        images = [given[k] for k in order]
        faces, crops, aligns, lms, skins = [], [], [], [], []
        for i, image in enumerate(images):
            with _timed(timings, "detect"):
                found = select_faces(self.detector.detect(image, "largest"), "largest")
            if not found:
                raise NoFaceFound(f"no face found in photo {order[i] + 1} of the set", index=order[i])
            crop, alignment, lm68_crop, skin = self._prepare(image, found[0], timings)
            faces.append(found[0])
            crops.append(crop)
            aligns.append(alignment)
            lms.append(lm68_crop)
            skins.append(skin)
        target = self._targets(crops, lms, skins)
        aggregation = "shared-identity fit"
        with self._lock:
            if self.rnet is not None:
                with _timed(timings, "rnet"):
                    out = self.rnet.run(target.image.cpu().numpy())
                per_image = Coefficients.from_vector(torch.from_numpy(out["coeffs"]).to(self.device),
                                                     self.model.layout)
                if self.cnet is not None:
                    conf = self.cnet.run(target.image.cpu().numpy(), out["features"])
                    agg_id, agg_tex = aggregate(per_image.id, per_image.tex,
                                                torch.from_numpy(conf["conf_id"]).to(self.device),
                                                torch.from_numpy(conf["conf_tex"]).to(self.device))
                    aggregation = "C-Net confidence-weighted mean"
                else:
                    agg_id, agg_tex = per_image.id.mean(0), per_image.tex.mean(0)
                    aggregation = "mean"
                b = per_image.batch_size
                coeffs = Coefficients(agg_id[None].expand(b, -1), per_image.exp, agg_tex[None].expand(b, -1),
                                      per_image.angle, per_image.gamma, per_image.trans)
                mode = "rnet"
                if refine if refine is not None else self.settings.refine:
                    with _timed(timings, "fit"):
                        cfg = FitConfig(**{**self.fit_config.__dict__, "share_identity": True})
                        coeffs = fit(self.decoder, self.renderer, target, init=coeffs, config=cfg).coefficients
                    mode, aggregation = "rnet+fit", aggregation + ", then shared-identity fit"
            else:
                coeffs, mode = self._coefficients(target, refine, timings, share_identity=True)
        agg_id = coeffs.id.mean(0, keepdim=True)
        agg_tex = coeffs.tex.mean(0, keepdim=True)
        zero = Coefficients.zeros(self.model.layout, 1, self.device)
        identity = Coefficients(agg_id, zero.exp, agg_tex, zero.angle, zero.gamma, zero.trans)
        items = []
        for i, image in enumerate(images):
            c = Coefficients(agg_id, coeffs.exp[i : i + 1], agg_tex, coeffs.angle[i : i + 1],
                             coeffs.gamma[i : i + 1], coeffs.trans[i : i + 1])
            items.append(self._finish(image, faces[i], aligns[i], crops[i], c, mode, lms[i], dict(timings)))
        back = sorted(range(len(order)), key=lambda k: order[k])  # items in the order the photos were given
        return SetReconstruction(items=[items[k] for k in back], identity=identity, aggregation=aggregation,
                                 timings=timings)

    # -- outputs -----------------------------------------------------------------------------------------------
    def mesh(self, decoded: DecodedFace, *, colors: Literal["lit", "albedo"] = "lit", uv: bool = True) -> MeshData:
        """The posed mesh in world space (dm), as the reference's OBJ; UVs when the model has them."""
        col = (decoded.colors if colors == "lit" else decoded.albedo)[0].detach().cpu().numpy()
        extras = self.model.extras
        has_uv = uv and self.model.has_uvs
        return MeshData(
            vertices=decoded.vertices_world[0].detach().cpu().numpy(),
            faces=self.model.triangles.cpu().numpy(),
            colors=col,
            uvs=extras["uv_coords"] if has_uv else None,
            uv_faces=extras["uv_triangles"] if has_uv else None,
        )

    def export(self, rec: Reconstruction, fmt: MeshFormat) -> bytes:
        with _timed(rec.timings, "export"):
            return export_mesh(self.mesh(rec.decoded, uv=fmt == "obj"), fmt)

    def export_textured(self, image: np.ndarray, rec: Reconstruction, fmt: Literal["obj", "glb"],
                        kind: Literal["photo", "albedo"] = "photo", size: int = 1024) -> dict[str, bytes]:
        """A textured mesh: ``{"mesh.obj", "mesh.mtl", "texture.png"}`` for OBJ, ``{"mesh.glb"}`` for GLB.

        ``kind="photo"``: the photo's colours sampled into the UV map where visible (mirrored/filled elsewhere);
        ``"albedo"``: the fitted model's de-lit albedo. Needs a face model with UVs (the default); raises
        ValueError otherwise (a model without UVs keeps per-vertex colours).
        """
        from facerecon.texture import make_texture, textured_glb, textured_obj

        with _timed(rec.timings, "texture"), self._lock:
            tex = make_texture(rec, self.model, image, kind, size=size, camera=self.decoder.camera,
                               renderer=self.renderer)
            if fmt == "obj":
                return textured_obj(rec, self.model, image, kind, texture=tex, camera=self.decoder.camera,
                                    renderer=self.renderer)
            return {"mesh.glb": textured_glb(rec, self.model, image, kind, texture=tex, camera=self.decoder.camera,
                                             renderer=self.renderer)}

    def identity_mesh(self, rec: SetReconstruction) -> MeshData:
        with torch.no_grad():
            return self.mesh(self.decoder(rec.identity))

    def overlay(self, image: np.ndarray, rec: Reconstruction) -> np.ndarray:
        """The shaded reconstruction composited over the photo, at the photo's resolution, ``(H, W, 3) uint8``."""
        with _timed(rec.timings, "render"):
            return overlay_on_photo(
                image, rec.decoded.vertices_cam, self.overlay_triangles,
                rec.decoded.colors.clamp(0, 1), rec.alignment.photo_intrinsics(self.decoder.camera),
                renderer=self.renderer,
            )

    def geometry_view(self, rec: Reconstruction) -> np.ndarray:
        """A plain grey shaded view of the geometry in the 224 crop camera, ``(224, 224, 3) uint8``."""
        return shaded_geometry(rec.decoded.vertices_cam, self.model.triangles, rec.decoded.normals_world,
                               self.decoder.camera.intrinsics, renderer=self.renderer)

    def to_json(self, rec: Reconstruction) -> dict[str, Any]:
        """Coefficients by name, landmarks in photo pixels (y down), pose, alignment, timings."""
        return {
            "face_model": self.model.name,
            "layout": self.model.layout.model_dump(),
            "mode": rec.mode,
            "coefficients": rec.coefficients.to_dict(),
            "pose_degrees": rec.pose_degrees(),
            "landmarks68": rec.landmarks_photo.tolist(),
            "detected_landmarks68": rec.face.lm68.tolist(),
            "box": [float(v) for v in rec.face.box],
            "detection": rec.face.to_dict(),
            "landmark_error_crop_px": rec.landmark_error_px,
            "alignment": rec.alignment.to_dict(),
            "photo_size": list(rec.photo_size),
            "timings_ms": {k: round(v, 2) for k, v in rec.timings.items()},
        }

"""The nvdiffrast backend against the CPU backend (needs CUDA and ``nvdiffrast.torch``; skipped otherwise).

Both backends must agree on the same mesh: mask IoU > 0.99, mean colour difference below one 8-bit level, depth
and gradients close. Timings of both are printed side by side (``pytest -s`` not needed: printed uncaptured).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from facerecon.geometry import Camera, euler_to_rotation
from facerecon.render import get_renderer
from facerecon.render.nvdiffrast_backend import nvdiffrast_status
from tests.conftest import ICT_MODEL

_USABLE, _REASON = nvdiffrast_status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _USABLE, reason=_REASON or "nvdiffrast unusable")]


@pytest.fixture(scope="module")
def gpu_renderer():
    renderer = get_renderer("nvdiffrast")
    try:
        renderer.warmup()  # builds nvdiffrast's plugin on first use (minutes)
    except Exception as exc:  # no compiler/headers: report as a skip with the reason
        pytest.skip(f"nvdiffrast plugin could not be built or loaded: {exc!r}")
    return renderer


@pytest.fixture(scope="module")
def meshes() -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(name, vertices_cam (B, N, 3), triangles (F, 3), colors (B, N, 3))`` on the CPU."""
    out = []
    if ICT_MODEL.exists():
        from facerecon.coefficients import Coefficients
        from facerecon.decoder import FaceDecoder
        from facerecon.facemodel import FaceModel

        model = FaceModel.from_file(ICT_MODEL)
        decoder = FaceDecoder(model)
        coeffs = Coefficients.zeros(model.layout, batch=2)
        coeffs.angle[1] = torch.tensor([0.2, -0.6, 0.1])  # a turned head: self-occlusion
        coeffs.trans[1] = torch.tensor([0.1, -0.05, 0.3])
        with torch.no_grad():
            face = decoder(coeffs)
        out.append(("face model", face.vertices_cam, model.triangles, face.colors.clamp(0, 1)))
    # a synthetic closed-ish surface with large depth range: a tilted half-ellipsoid
    rows = cols = 100
    lat = np.linspace(-0.48 * np.pi, 0.48 * np.pi, rows)
    lon = np.linspace(-0.48 * np.pi, 0.48 * np.pi, cols)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    pts = np.stack([0.8 * np.cos(la) * np.sin(lo), np.sin(la), 0.6 * np.cos(la) * np.cos(lo)], -1).reshape(-1, 3)
    rot = euler_to_rotation(torch.tensor([[0.3, 0.5, 0.0]], dtype=torch.float64))[0].numpy()
    world = pts @ rot.T
    cam = np.concatenate([world[:, :2], 10.0 - world[:, 2:]], 1)
    idx = np.arange(rows * cols).reshape(rows, cols)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tris = np.concatenate([np.stack([a, b, d], -1), np.stack([a, d, c], -1)])
    colors = np.stack([0.5 + 0.5 * np.sin(5 * lo), 0.5 + 0.5 * np.cos(3 * la), np.full_like(la, 0.3)], -1)
    out.append(
        (
            "half-ellipsoid",
            torch.tensor(cam[None], dtype=torch.float32),
            torch.tensor(tris, dtype=torch.int64),
            torch.tensor(colors.reshape(1, -1, 3), dtype=torch.float32),
        )
    )
    return out


def _time(fn, sync, repeats: int = 30) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def test_backends_agree_on_meshes(gpu_renderer, meshes, capsys) -> None:
    cpu = get_renderer("cpu")
    dev = gpu_renderer.device
    intr = Camera().intrinsics
    rows = []
    for name, verts, tris, colors in meshes:
        ref = cpu.render(verts, tris, colors, intr)
        got = gpu_renderer.render(verts.to(dev), tris.to(dev), colors.to(dev), intr)
        m_cpu = ref.mask.bool()
        m_gpu = got.mask.bool().cpu()
        iou = float((m_cpu & m_gpu).sum() / (m_cpu | m_gpu).sum())
        assert iou > 0.99, (name, iou)
        both = (m_cpu & m_gpu).expand_as(ref.image)
        colour_diff = float((ref.image[both] - got.image.cpu()[both]).abs().mean())
        assert colour_diff < 1.0 / 255.0, (name, colour_diff)
        depth_diff = float((ref.depth - got.depth.cpu()).abs()[(m_cpu & m_gpu)].mean())
        assert depth_diff < 1e-3, (name, depth_diff)
        id_cpu = cpu.rasterize(verts, tris, intr).triangle_id
        id_gpu = gpu_renderer.rasterize(verts.to(dev), tris.to(dev), intr).triangle_id.cpu()
        same_id = float((id_cpu == id_gpu)[(m_cpu & m_gpu)[:, 0]].float().mean())
        assert same_id > 0.98, (name, same_id)

        def cpu_run(verts=verts, tris=tris, colors=colors):
            return cpu.render(verts, tris, colors, intr)

        v_d, t_d, c_d = verts.to(dev), tris.to(dev), colors.to(dev)

        def gpu_run(v_d=v_d, t_d=t_d, c_d=c_d):
            return gpu_renderer.render(v_d, t_d, c_d, intr)

        rows.append(
            (
                name,
                verts.shape[0],
                _time(cpu_run, lambda: None),
                _time(gpu_run, lambda: torch.cuda.synchronize(dev)),
                iou,
                colour_diff * 255,
            )
        )
    with capsys.disabled():
        print(f"\n{'mesh':<16}{'B':>3}{'cpu ms':>10}{'nvdiffrast ms':>15}{'mask IoU':>10}{'|dC| (1/255)':>14}")
        for name, b, t_cpu, t_gpu, iou, dc in rows:
            print(f"{name:<16}{b:>3}{t_cpu:>10.2f}{t_gpu:>15.3f}{iou:>10.4f}{dc:>14.3f}")


def test_gradients_agree_between_backends(gpu_renderer, meshes) -> None:
    """Interior gradients (no antialiasing) w.r.t. colours and positions point the same way on both backends."""
    name, verts, tris, colors = meshes[-1]
    intr = Camera().intrinsics
    target = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    grads = []
    for renderer in (get_renderer("cpu"), gpu_renderer):
        dev = renderer.device
        v = verts.to(dev).clone().requires_grad_(True)
        c = colors.to(dev).clone().requires_grad_(True)
        image = renderer.render(v, tris.to(dev), c, intr).image
        ((image - target.to(dev)) ** 2).sum().backward()
        grads.append((v.grad.cpu().flatten(), c.grad.cpu().flatten()))
    (gv_cpu, gc_cpu), (gv_gpu, gc_gpu) = grads
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(gc_cpu, gc_gpu, dim=0)) > 0.99, name
    assert float(cos(gv_cpu, gv_gpu, dim=0)) > 0.9, name


def test_antialias_touches_only_silhouette_pixels(gpu_renderer, meshes) -> None:
    _, verts, tris, colors = meshes[-1]
    dev = gpu_renderer.device
    intr = Camera().intrinsics
    plain = gpu_renderer.render(verts.to(dev), tris.to(dev), colors.to(dev), intr)
    smooth = gpu_renderer.render(verts.to(dev), tris.to(dev), colors.to(dev), intr, antialias=True)
    changed = (plain.image != smooth.image).any(1)[0]
    mask_pixels = int((plain.mask > 0).sum())
    # only pixels along silhouettes (outer and self-occlusion edges) change: a thin set
    assert 0 < int(changed.sum()) < 0.15 * mask_pixels
    assert torch.equal(plain.mask, smooth.mask)

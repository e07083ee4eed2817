"""The rendering module: coverage, barycentrics, depth test, clipping, gradients, backends, overlays.

Expectations are computed independently of the rasteriser: 2D half-plane tests and affine barycentrics for
constant-depth triangles, and a brute-force numpy ray caster (ray-triangle intersection by solving a 3 x 3 system
per pixel and triangle) for everything with depth.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from facerecon.geometry import Camera, Intrinsics, project
from facerecon.render import CpuRenderer, get_renderer
from facerecon.render.nvdiffrast_backend import clip_space, nvdiffrast_status, projection_matrix
from facerecon.render.overlay import overlay_on_photo, save_png, shaded_geometry
from tests.conftest import ICT_MODEL

CPU = CpuRenderer()


# --------------------------------------------------------------------------------------------------------------
# independent references


def pixel_rays(intr: Intrinsics) -> np.ndarray:
    """``(H, W, 3)`` camera rays ``((u - cx)/fx, (v_up - cy)/fy, 1)`` through the pixel centres."""
    cols = np.arange(intr.width) + 0.5
    v_up = intr.height - (np.arange(intr.height) + 0.5)
    u, v = np.meshgrid(cols, v_up)
    return np.stack([(u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy, np.ones_like(u)], -1)


def raycast(
    verts: np.ndarray, tris: np.ndarray, intr: Intrinsics, znear: float = 5.0, zfar: float = 15.0, eps: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Brute-force visibility: ``(triangle_id (H, W), depth (H, W), barycentrics (H, W, 3), ambiguous (H, W))``.

    Per pixel and triangle, solve ``t ray = V0 + b1 (V1 - V0) + b2 (V2 - V0)``; a hit needs ``b >= 0`` and
    ``znear <= t <= zfar``; the smallest t wins. ``ambiguous`` marks pixels too close to an edge, a clip plane or a
    depth tie to decide robustly (tests skip them).
    """
    rays = pixel_rays(intr).reshape(-1, 3)
    p = rays.shape[0]
    best_t = np.full(p, np.inf)
    best_id = np.full(p, -1)
    best_b = np.zeros((p, 3))
    ambiguous = np.zeros(p, bool)
    second_t = np.full(p, np.inf)
    for f, (i0, i1, i2) in enumerate(tris):
        v0, v1, v2 = verts[i0], verts[i1], verts[i2]
        m = np.stack([rays, np.broadcast_to(v0 - v1, rays.shape), np.broadcast_to(v0 - v2, rays.shape)], -1)
        det = np.linalg.det(m)
        ok = np.abs(det) > 1e-12
        sol = np.zeros((p, 3))
        sol[ok] = np.linalg.solve(m[ok], np.broadcast_to(v0, (int(ok.sum()), 3))[..., None])[..., 0]
        t, b1, b2 = sol.T
        b = np.stack([1 - b1 - b2, b1, b2], -1)
        margin = np.where(ok, np.minimum(b.min(-1), np.minimum(t - znear, zfar - t)), -1.0)
        hit = margin > 0
        ambiguous |= np.abs(margin) < eps
        closer = hit & (t < best_t)
        second_t = np.where(closer, best_t, np.where(hit, np.minimum(second_t, t), second_t))
        best_t = np.where(closer, t, best_t)
        best_id = np.where(closer, f, best_id)
        best_b = np.where(closer[:, None], b, best_b)
    with np.errstate(invalid="ignore"):  # inf - inf where nothing or one thing was hit
        ambiguous |= np.abs(second_t - best_t) < eps
    shape = (intr.height, intr.width)
    depth = np.where(best_id >= 0, best_t, 0.0)
    return best_id.reshape(shape), depth.reshape(shape), best_b.reshape(*shape, 3), ambiguous.reshape(shape)


def from_pixels(uvd: list[tuple[float, float, float]], intr: Intrinsics) -> torch.Tensor:
    """Camera-space vertices ``(1, n, 3)`` float32 that project to the given ``(u, v_up)`` at depth d."""
    pts = [((u - intr.cx) * d / intr.fx, (v - intr.cy) * d / intr.fy, d) for u, v, d in uvd]
    return torch.tensor([pts], dtype=torch.float32)


def cube(rotation: np.ndarray, centre: np.ndarray, size: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A cube in world space (right-handed, z towards the camera), posed, then to camera space ``d = 10 - z``.

    Returns ``(vertices_cam (1, 8, 3) float32, triangles (12, 3) int64)``; triangles 2k and 2k + 1 make face k,
    counter-clockwise seen from outside.
    """
    corners = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)]) * size
    index = {tuple(np.sign(c).astype(int)): i for i, c in enumerate(corners)}
    tris = []
    for axis in range(3):
        a, b = (axis + 1) % 3, (axis + 2) % 3  # e_a x e_b = e_axis
        for sign in (1, -1):
            quad = []
            for sa, sb in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                key = [0, 0, 0]
                key[axis], key[a], key[b] = sign, sa, sb * sign  # flip the winding on the negative side
                quad.append(index[tuple(key)])
            tris += [[quad[0], quad[1], quad[2]], [quad[0], quad[2], quad[3]]]
    world = corners @ rotation.T + centre
    cam = np.concatenate([world[:, :2], 10.0 - world[:, 2:]], 1)
    return torch.tensor(cam[None], dtype=torch.float32), torch.tensor(tris, dtype=torch.int64)


def rotation_to(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation taking unit vector a to unit vector b (Rodrigues)."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k / (1 + c)


def half_ellipsoid(rows: int = 40, cols: int = 40, depth: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A front half-ellipsoid facing the camera (semi-axes 0.8, 1.0, 0.6 dm), CCW from the camera."""
    lat = np.linspace(-0.48 * np.pi, 0.48 * np.pi, rows)
    lon = np.linspace(-0.48 * np.pi, 0.48 * np.pi, cols)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    pts = np.stack([0.8 * np.cos(la) * np.sin(lo), np.sin(la), depth - 0.6 * np.cos(la) * np.cos(lo)], -1)
    idx = np.arange(rows * cols).reshape(rows, cols)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tris = np.concatenate([np.stack([a, b, d], -1), np.stack([a, d, c], -1)])
    return torch.tensor(pts.reshape(1, -1, 3), dtype=torch.float32), torch.tensor(tris, dtype=torch.int64)


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary dilation, ``steps`` times (outside the image counts as empty)."""
    out = mask.copy()
    for _ in range(steps):
        p = np.pad(out, 1)
        out = out | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


# --------------------------------------------------------------------------------------------------------------
# coverage and barycentrics


INTR = Intrinsics(fx=100.0, fy=90.0, cx=17.3, cy=13.1, width=40, height=30)  # off-centre, non-square, fx != fy


def test_single_triangle_covers_exactly_the_centres_inside_with_exact_barycentrics() -> None:
    uv = np.array([[5.3, 4.2], [33.7, 9.9], [14.1, 26.6]])  # CCW in the y-up frame
    verts = from_pixels([(u, v, 10.0) for u, v in uv], INTR)
    tris = torch.tensor([[0, 1, 2]])
    raster = CPU.rasterize(verts, tris, INTR)

    # independent: affine barycentrics of each pixel centre (u = c + 0.5, v_up = H - r - 0.5) by a 3x3 solve
    cols, rows = np.meshgrid(np.arange(INTR.width), np.arange(INTR.height))
    centre = np.stack([cols + 0.5, INTR.height - rows - 0.5, np.ones_like(cols, dtype=float)], -1)
    m = np.vstack([uv.T, np.ones(3)])
    lam = np.linalg.solve(m, centre.reshape(-1, 3).T).T.reshape(INTR.height, INTR.width, 3)
    assert np.abs(lam).min() > 1e-4, "test triangle must keep pixel centres off its edges"
    inside = (lam > 0).all(-1)
    assert 150 < inside.sum() < 400

    assert raster.triangle_id.shape == (1, 30, 40) and raster.triangle_id.dtype == torch.int64
    assert raster.barycentrics.shape == (1, 30, 40, 3) and raster.barycentrics.dtype == torch.float32
    np.testing.assert_array_equal(raster.mask[0].numpy(), inside)
    np.testing.assert_array_equal(raster.triangle_id[0].numpy(), np.where(inside, 0, -1))
    np.testing.assert_allclose(raster.barycentrics[0].numpy()[inside], lam[inside], atol=2e-6)
    assert (raster.barycentrics[0][~torch.from_numpy(inside)] == 0).all()
    np.testing.assert_allclose(raster.depth[0].numpy()[inside], 10.0, rtol=1e-6)
    assert (raster.depth[0].numpy()[~inside] == 0).all()

    # both windings are rasterised: the clockwise copy covers the same pixels, barycentrics follow the vertex order
    cw = CPU.rasterize(verts, torch.tensor([[0, 2, 1]]), INTR)
    np.testing.assert_array_equal(cw.mask[0].numpy(), inside)
    np.testing.assert_allclose(cw.barycentrics[0].numpy()[inside], lam[inside][:, [0, 2, 1]], atol=2e-6)


def test_perspective_correct_barycentrics_and_depth_match_ray_casting() -> None:
    verts = from_pixels([(3.2, 2.7, 6.0), (37.1, 8.3, 13.5), (12.9, 27.4, 9.0)], INTR)
    tris = torch.tensor([[0, 1, 2]])
    raster = CPU.rasterize(verts, tris, INTR)
    ref_id, ref_depth, ref_bary, amb = raycast(verts[0].double().numpy(), tris.numpy(), INTR)
    sure = ~amb
    np.testing.assert_array_equal(raster.triangle_id[0].numpy()[sure], ref_id[sure])
    hit = sure & (ref_id >= 0)
    assert hit.sum() > 150
    np.testing.assert_allclose(raster.barycentrics[0].numpy()[hit], ref_bary[hit], atol=1e-5)
    np.testing.assert_allclose(raster.depth[0].numpy()[hit], ref_depth[hit], rtol=1e-6)
    # interpolating the vertex depths with them gives the ray depth back (perspective-correct, not affine)
    d = CPU.interpolate(verts[..., 2:3], raster, tris)[0, ..., 0].numpy()
    np.testing.assert_allclose(d[hit], ref_depth[hit], rtol=1e-5)
    affine = (ref_bary[hit] * verts[0, :, 2].numpy()[None]).sum(-1)
    np.testing.assert_allclose(affine, ref_depth[hit], rtol=1e-6)


def test_shared_edge_through_pixel_centres_has_no_holes_and_one_owner() -> None:
    # a square split along a diagonal that passes exactly through pixel centres; dyadic numbers keep it exact
    intr = Intrinsics(128.0, 128.0, 10.0, 10.0, 20, 20)
    quad = from_pixels([(4.5, 4.5, 8.0), (15.5, 4.5, 8.0), (15.5, 15.5, 8.0), (4.5, 15.5, 8.0)], intr)
    t1 = torch.tensor([[0, 1, 2], [0, 2, 3]])
    t2 = torch.tensor([[0, 2, 3], [0, 1, 2]])
    r1, r2 = CPU.rasterize(quad, t1, intr), CPU.rasterize(quad, t2, intr)
    # centres strictly inside the square: columns/rows 5..14 (u = 5.5 ... 14.5)
    expected = np.zeros((20, 20), bool)
    expected[5:15, 5:15] = True
    for r in (r1, r2):
        covered = r.mask[0].numpy()
        np.testing.assert_array_equal(covered[5:15, 5:15], True)
        assert covered.sum() >= expected.sum()
    # the owner of each on-diagonal centre is decided by the tie rule, not by submission order
    first = torch.where(r1.triangle_id[0] == 0, 0, 1)  # triangle (0, 1, 2) -> 0
    second = torch.where(r2.triangle_id[0] == 1, 0, 1)
    mask = r1.mask[0]
    assert torch.equal(first[mask], second[mask])
    assert torch.equal(r1.mask, r2.mask)


# --------------------------------------------------------------------------------------------------------------
# depth test and clipping


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_nearer_triangle_wins_the_overlap_in_both_orders(order: tuple[int, int]) -> None:
    near = [(4.3, 3.1, 8.0), (30.2, 6.4, 8.0), (12.7, 25.9, 8.0)]
    far = [(10.1, 2.2, 12.0), (36.6, 12.3, 12.0), (22.4, 28.8, 12.0)]
    verts = from_pixels(near + far, INTR)
    tris_all = torch.tensor([[0, 1, 2], [3, 4, 5]])
    tris = tris_all[list(order)]
    raster = CPU.rasterize(verts, tris, INTR)
    ref_id, ref_depth, _, amb = raycast(verts[0].double().numpy(), tris.numpy(), INTR)
    sure = ~amb
    np.testing.assert_array_equal(raster.triangle_id[0].numpy()[sure], ref_id[sure])
    np.testing.assert_allclose(raster.depth[0].numpy()[sure], ref_depth[sure], rtol=1e-6)
    # the overlap exists and belongs to the near triangle (depth 8)
    near_id = order.index(0)
    both = CPU.rasterize(verts, tris_all[[0]], INTR).mask[0] & CPU.rasterize(verts, tris_all[[1]], INTR).mask[0]
    assert both.sum() > 30
    assert (raster.triangle_id[0][both] == near_id).all()
    np.testing.assert_allclose(raster.depth[0][both].numpy(), 8.0, rtol=1e-6)


def test_interpenetrating_triangles_split_where_their_depths_cross() -> None:
    a = [(2.3, 3.4, 7.0), (37.2, 5.1, 13.0), (18.6, 27.3, 10.0)]
    b = [(3.1, 24.8, 13.0), (36.4, 22.9, 7.0), (20.2, 2.6, 10.0)]
    verts = from_pixels(a + b, INTR)
    tris = torch.tensor([[0, 1, 2], [3, 4, 5]])
    raster = CPU.rasterize(verts, tris, INTR)
    ref_id, ref_depth, _, amb = raycast(verts[0].double().numpy(), tris.numpy(), INTR)
    sure = ~amb
    np.testing.assert_array_equal(raster.triangle_id[0].numpy()[sure], ref_id[sure])
    np.testing.assert_allclose(raster.depth[0].numpy()[sure], ref_depth[sure], rtol=1e-6)
    overlap_ids = set(ref_id[sure & (ref_id >= 0)].tolist())
    assert overlap_ids == {0, 1}


def test_cube_seen_from_a_corner_shows_three_faces_with_ray_plane_depths() -> None:
    rot = rotation_to(np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0]))
    verts, tris = cube(rot, np.array([0.05, -0.03, 0.0]))
    intr = Camera().intrinsics
    raster = CPU.rasterize(verts, tris, intr)
    ref_id, ref_depth, _, amb = raycast(verts[0].double().numpy(), tris.numpy(), intr, eps=1e-5)
    sure = ~amb
    assert amb.sum() < 0.02 * (ref_id >= 0).sum()
    np.testing.assert_array_equal(raster.triangle_id[0].numpy()[sure], ref_id[sure])
    hit = sure & (ref_id >= 0)
    np.testing.assert_allclose(raster.depth[0].numpy()[hit], ref_depth[hit], rtol=1e-6)
    faces = raster.triangle_id[0][raster.mask[0]] // 2
    counts = torch.bincount(faces, minlength=6)
    visible = (counts > 0).nonzero().flatten().tolist()
    assert len(visible) == 3
    assert counts[visible].min() > 0.25 * counts.max()  # three similar regions (symmetric view)
    # the visible faces are the three whose outward normals point at the camera: +x, +y, +z in cube space
    assert visible == [0, 2, 4]  # faces (axis, sign): 0 = +x, 2 = +y, 4 = +z


def test_clipping_at_znear_zfar_and_behind_the_camera() -> None:
    intr = Camera().intrinsics
    # one vertex in front of the near plane, one behind the camera, one beyond the far plane
    verts = torch.tensor(
        [[[-0.4, -0.3, 10.0], [0.5, -0.2, 3.0], [0.0, 0.6, 10.0], [0.3, 0.2, -2.0], [-0.2, 0.5, 20.0]]]
    )
    for tris in (torch.tensor([[0, 1, 2]]), torch.tensor([[0, 3, 2]]), torch.tensor([[0, 1, 4]])):
        for znear, zfar in ((5.0, 15.0), (8.0, 12.0)):
            raster = CPU.rasterize(verts, tris, intr, znear=znear, zfar=zfar)
            ref_id, ref_depth, _, amb = raycast(verts[0].double().numpy(), tris.numpy(), intr, znear, zfar, 1e-5)
            sure = ~amb
            np.testing.assert_array_equal(raster.triangle_id[0].numpy()[sure], ref_id[sure])
            hit = sure & (ref_id >= 0)
            assert hit.sum() > 100
            np.testing.assert_allclose(raster.depth[0].numpy()[hit], ref_depth[hit], rtol=1e-6)
            d = raster.depth[0][raster.mask[0]]
            assert (d >= znear).all() and (d <= zfar).all()
    # entirely outside the slab: nothing
    beyond = torch.tensor([[[-0.4, -0.3, 16.0], [0.5, -0.2, 17.0], [0.0, 0.6, 18.0]]])
    assert not CPU.rasterize(beyond, torch.tensor([[0, 1, 2]]), intr).mask.any()


# --------------------------------------------------------------------------------------------------------------
# interpolation, render, gradients


def test_render_batch_and_broadcast_colours() -> None:
    verts, tris = half_ellipsoid()
    verts2 = torch.cat([verts, verts + torch.tensor([0.3, 0.0, 0.5])])
    colors = torch.rand(1, verts.shape[1], 3)
    intr = Camera().intrinsics
    image, mask, depth = CPU.render(verts2, tris, colors, intr)
    assert image.shape == (2, 3, 224, 224) and mask.shape == (2, 1, 224, 224) and depth.shape == (2, 1, 224, 224)
    assert image.dtype == mask.dtype == depth.dtype == torch.float32
    assert ((mask == 0) | (mask == 1)).all() and (image[mask.expand_as(image) == 0] == 0).all()
    assert ((depth > 0) == (mask > 0)).all()
    # each batch element equals its own single render
    for b in range(2):
        single = CPU.render(verts2[b : b + 1], tris, colors, intr)
        torch.testing.assert_close(single.image[0], image[b])
        torch.testing.assert_close(single.depth[0], depth[b])
    # interpolate == image before masking; the autograd (torch) and kernel (numba) paths agree
    raster = CPU.rasterize(verts2, tris, intr)
    fast = CPU.interpolate(colors, raster, tris)
    slow = CPU.interpolate(colors.clone().requires_grad_(True), raster, tris)
    torch.testing.assert_close(fast.permute(0, 3, 1, 2), image)
    torch.testing.assert_close(slow.detach(), fast)


def test_differentiable_barycentrics_equal_the_kernel_ones() -> None:
    verts, tris = half_ellipsoid(60, 60)
    intr = Camera().intrinsics
    plain = CPU.rasterize(verts, tris, intr)
    graded = CPU.rasterize(verts.clone().requires_grad_(True), tris, intr)
    assert graded.barycentrics.requires_grad and not plain.barycentrics.requires_grad
    assert torch.equal(plain.triangle_id, graded.triangle_id)
    torch.testing.assert_close(graded.barycentrics.detach(), plain.barycentrics, atol=1e-6, rtol=0)
    torch.testing.assert_close(graded.depth.detach(), plain.depth, atol=1e-5, rtol=0)


def test_gradients_match_finite_differences() -> None:
    intr = Intrinsics(60.0, 55.0, 6.3, 5.2, 13, 11)
    verts = from_pixels([(0.7, 0.9, 9.0), (12.2, 1.6, 10.5), (5.9, 10.3, 11.5), (12.6, 9.8, 8.5)], intr).double()
    tris = torch.tensor([[0, 1, 2], [1, 3, 2]])
    colors = torch.rand(1, 4, 2, dtype=torch.float64)

    def f(v: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raster = CPU.rasterize(v, tris, intr)
        return CPU.interpolate(c, raster, tris), raster.depth

    v = verts.clone().requires_grad_(True)
    c = colors.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (v, c), eps=1e-6, atol=1e-6, rtol=1e-4)
    # and the position gradient is real (not zero) where the triangles are
    img, depth = f(v, c)
    (img.sum() + depth.sum()).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0.1


def test_position_gradient_of_an_image_loss_matches_central_differences() -> None:
    verts, tris = half_ellipsoid(12, 12)
    verts = verts.double()
    intr = Intrinsics(400.0, 400.0, 32.0, 32.0, 64, 64)
    colors = torch.rand(1, verts.shape[1], 3, dtype=torch.float64)
    target = torch.rand(1, 3, 64, 64, dtype=torch.float64)

    def loss(v: torch.Tensor) -> torch.Tensor:
        return ((CPU.render(v, tris, colors, intr).image - target) ** 2).sum()

    v = verts.clone().requires_grad_(True)
    loss(v).backward()
    assert v.grad is not None
    rng = np.random.default_rng(0)
    checked = 0
    for k in rng.choice(verts.shape[1], 8, replace=False):
        for axis in range(3):
            h = 1e-6
            plus, minus = verts.clone(), verts.clone()
            plus[0, k, axis] += h
            minus[0, k, axis] -= h
            with torch.no_grad():
                # silhouette flips are not differentiable: compare only where the visibility did not change
                if not torch.equal(
                    CPU.rasterize(plus, tris, intr).triangle_id, CPU.rasterize(minus, tris, intr).triangle_id
                ):
                    continue
                fd = float((loss(plus) - loss(minus)) / (2 * h))
            assert fd == pytest.approx(float(v.grad[0, k, axis]), rel=1e-4, abs=1e-6)
            checked += 1
    assert checked >= 18


# --------------------------------------------------------------------------------------------------------------
# validation and backend selection


def test_bad_inputs_are_rejected_with_clear_messages() -> None:
    verts = torch.zeros(1, 3, 3)
    tris = torch.tensor([[0, 1, 2]])
    intr = Camera().intrinsics
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        CPU.rasterize(torch.zeros(3, 3), tris, intr)
    with pytest.raises(ValueError, match=r"\(F, 3\)"):
        CPU.rasterize(verts, torch.tensor([0, 1, 2]), intr)
    with pytest.raises(TypeError, match="int64"):
        CPU.rasterize(verts, tris.int(), intr)
    with pytest.raises(ValueError, match="outside the 3 vertices"):
        CPU.rasterize(verts, torch.tensor([[0, 1, 3]]), intr)
    with pytest.raises(ValueError, match="znear"):
        CPU.rasterize(verts, tris, intr, znear=0.0)
    with pytest.raises(ValueError, match="needs vertices_cam on cpu"):
        CPU.rasterize(torch.zeros(1, 3, 3, device="meta"), tris, intr)
    raster = CPU.rasterize(verts + torch.tensor([0.0, 0.0, 10.0]), tris, intr)
    with pytest.raises(ValueError, match=r"\(1, 3, C\)"):
        CPU.interpolate(torch.zeros(1, 4, 3), raster, tris)
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        CPU.interpolate(torch.zeros(3, 3), raster, tris)
    with pytest.raises(NotImplementedError, match=r"supersampl|higher resolution"):
        CPU.render(verts, tris, torch.zeros(1, 3, 3), intr, antialias=True)


def test_get_renderer_selects_and_explains() -> None:
    assert get_renderer("cpu") is get_renderer("CPU")
    assert get_renderer("auto", "cpu").name == "cpu"
    with pytest.raises(ValueError, match="unknown renderer"):
        get_renderer("opengl")
    usable, reason = nvdiffrast_status()
    if not usable:
        assert get_renderer("auto").name == "cpu"
        with pytest.raises(RuntimeError, match="unusable"):
            get_renderer("nvdiffrast")
        assert reason


def test_nvdiffrast_clip_space_matches_the_reference_matrix_and_our_pixel_convention() -> None:
    p = projection_matrix(Camera().intrinsics, 5.0, 15.0, dtype=torch.float64)
    s = 1015.0 / 112.0
    ref = torch.tensor([[s, 0, 0, 0], [0, -s, 0, 0], [0, 0, 2, -15], [0, 0, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(p, ref)
    # general intrinsics: nvdiffrast's NDC -> pixel map (col = (x + 1) W / 2, row = (y + 1) H / 2, centres at +0.5)
    # must give u = col and v_up = H - row from geometry.project
    intr = Intrinsics(fx=812.0, fy=790.0, cx=70.3, cy=101.9, width=160, height=120)
    pts = torch.rand(1, 50, 3, dtype=torch.float64) * torch.tensor([1.0, 1.0, 8.0]) + torch.tensor([-0.5, -0.5, 6.0])
    clip = clip_space(pts, intr, 5.0, 15.0)
    ndc = clip[..., :3] / clip[..., 3:]
    col = (ndc[..., 0] + 1) * intr.width / 2
    row = (ndc[..., 1] + 1) * intr.height / 2
    uv = project(pts, intr)
    torch.testing.assert_close(col, uv[..., 0])
    torch.testing.assert_close(intr.height - row, uv[..., 1])
    torch.testing.assert_close(ndc[..., 2], (2 - 15 / pts[..., 2]) * 1.0)  # -1 at d = 5, +1 at d = 15


# --------------------------------------------------------------------------------------------------------------
# overlay and images


def test_overlay_window_matches_a_full_frame_render_and_antialiases() -> None:
    h0, w0 = 90, 120
    intr = Intrinsics(fx=600.0, fy=600.0, cx=57.3, cy=49.2, width=w0, height=h0)
    verts, tris = half_ellipsoid(20, 20)
    colors = torch.full((1, verts.shape[1], 3), 0.4)
    colors[..., 0] = 1.0
    face = np.array([255, 102, 102])
    photo = np.random.default_rng(1).integers(0, 256, (h0, w0, 3), dtype=np.uint8)
    hard = overlay_on_photo(photo, verts, tris, colors, intr, antialias="supersample", supersample=1)
    image, mask, _ = CPU.render(verts, tris, colors, intr)
    m = mask[0, 0].numpy().astype(bool)
    assert 500 < m.sum() < 0.8 * m.size
    expected = np.where(m[..., None], np.rint(image[0].permute(1, 2, 0).numpy() * 255), photo).astype(np.uint8)
    np.testing.assert_array_equal(hard, expected)

    for aa in ("edge", "supersample"):  # the default (edges only) and 2x supersampling
        soft = overlay_on_photo(photo, verts, tris, colors, intr, antialias=aa)  # type: ignore[arg-type]
        _check_soft(soft, photo, m, face)
    half = overlay_on_photo(photo, verts, tris, colors, intr, alpha=0.5, antialias="supersample", supersample=1)
    np.testing.assert_allclose(half[m], 0.5 * photo[m] + 0.5 * hard[m], atol=1.0)
    half_edge = overlay_on_photo(photo, verts, tris, colors, intr, alpha=0.5)
    inner = ~dilate(~m, 2)
    np.testing.assert_allclose(half_edge[inner], 0.5 * photo[inner] + 0.5 * hard[inner], atol=1.0)
    with pytest.raises(ValueError, match="photo_intrinsics"):
        overlay_on_photo(photo[:-1], verts, tris, colors, intr)


def _check_soft(soft: np.ndarray, photo: np.ndarray, m: np.ndarray, face: np.ndarray) -> None:
    assert soft.shape == photo.shape and soft.dtype == np.uint8
    far = ~dilate(m, 2)
    np.testing.assert_array_equal(soft[far], photo[far])  # background untouched
    interior = ~dilate(~m, 2)  # (the edge filter's 3 x 3 box reaches diagonal neighbours)
    np.testing.assert_array_equal(soft[interior], np.broadcast_to(face, soft[interior].shape))
    # along the silhouette some pixels are blends (strictly between photo and face colour)
    edge = dilate(m, 1) & ~interior
    blended = (soft[edge] != photo[edge]).any(-1) & (soft[edge] != face).any(-1)
    assert blended.sum() > 20


def test_shaded_geometry_of_a_facing_plane_and_png_round_trip(tmp_path) -> None:
    intr = Intrinsics(100.0, 100.0, 16.0, 16.0, 32, 32)
    verts = from_pixels([(6.2, 6.1, 10.0), (26.3, 6.4, 10.0), (26.1, 26.2, 10.0), (6.4, 25.9, 10.0)], intr)
    tris = torch.tensor([[0, 1, 2], [0, 2, 3]])
    normals = torch.tensor([[[0.0, 0.0, 1.0]] * 4])
    img = shaded_geometry(verts, tris, normals, intr, background=(10, 20, 30))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (img[16, 16] == round(0.8 * 255)).all()  # albedo 0.8, headlight on a facing plane
    assert (img[0, 0] == [10, 20, 30]).all()
    tilted = shaded_geometry(verts, tris, normals, intr, light=(0.0, 1.0, 1.0))
    expected = 0.8 * (0.25 + 0.75 * math.cos(math.pi / 4)) * 255
    assert abs(int(tilted[16, 16, 0]) - expected) <= 1
    path = tmp_path / "g.png"
    save_png(img, path)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(path)), img)
    save_png(torch.full((1, 3, 4, 5), 2.0), tmp_path / "t.png")  # floats: x255 and clamped
    assert (np.asarray(Image.open(tmp_path / "t.png")) == 255).all()


# --------------------------------------------------------------------------------------------------------------
# the real default face model


@pytest.mark.skipif(not ICT_MODEL.exists(), reason=f"needs the default face model {ICT_MODEL}")
def test_mean_face_renders_a_plausible_symmetric_mask(ict_model, ict_decoder) -> None:
    from facerecon.coefficients import Coefficients

    with torch.no_grad():
        face = ict_decoder(Coefficients.zeros(ict_model.layout))
    image, mask, depth = CPU.render(face.vertices_cam, ict_model.triangles, face.colors, Camera().intrinsics)
    m = mask[0, 0].numpy().astype(bool)
    area = m.mean()
    assert 0.2 < area < 0.9, area
    # left/right symmetry of the silhouette about the principal point column (u = 112: columns 0..111 | 112..223)
    mirrored = m[:, ::-1]
    iou = (m & mirrored).sum() / (m | mirrored).sum()
    assert iou > 0.97, iou
    d = depth[0, 0][mask[0, 0] > 0]
    assert 9.0 < float(d.min()) < float(d.max()) < 12.0
    assert image.max() <= face.colors.max() + 1e-5 and image.min() >= 0


def test_edge_antialiased_overlay_looks_like_the_supersampled_one_on_a_real_photo(reconstructor) -> None:
    """The fast overlay (render at the face's scale, antialias only the edges) against the former 2x supersampled
    path, on a 1080-px example photo: the same pixels are painted, and the colours agree except along edges."""
    from facerecon.imaging import load_image
    from tests.conftest import need_shared

    image = load_image(need_shared("data", "deep3d-examples", "015316.jpg"))
    assert image.shape[0] >= 1080
    rec = reconstructor.reconstruct(image, refine=False)[0]
    args = (image, rec.decoded.vertices_cam, reconstructor.overlay_triangles, rec.decoded.colors.clamp(0, 1),
            rec.alignment.photo_intrinsics(reconstructor.decoder.camera))
    fast = overlay_on_photo(*args, renderer=reconstructor.renderer).astype(int)
    slow = overlay_on_photo(*args, renderer=reconstructor.renderer, antialias="supersample").astype(int)
    painted_fast = (fast != image).any(-1)
    painted_slow = (slow != image).any(-1)
    band = dilate(painted_slow, 3) & dilate(~painted_slow, 3)  # within 3 px of the former outline
    assert ((painted_fast ^ painted_slow) & ~band).sum() < 200  # the outline is where it was
    diff = np.abs(fast - slow).max(-1)[painted_slow]
    print(f"\nfast vs supersampled overlay: mean {diff.mean():.2f}, p95 {np.percentile(diff, 95):.0f} levels")
    assert diff.mean() < 4.0  # 0-255 levels
    assert np.percentile(diff, 95) < 16
    assert (diff > 48).mean() < 0.02  # large differences only on the edges' few pixels


def test_encode_png_round_trips_and_save_png_uses_it(tmp_path) -> None:
    from PIL import Image

    from facerecon.render.overlay import encode_png

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    image[10:20] = image[9]  # rows equal to the one above ("up" filter zeros)
    data = encode_png(image)
    back = Image.open(io.BytesIO(data))
    assert back.format == "PNG" and back.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(back), image)
    save_png(image, tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), image)
    with pytest.raises(ValueError):
        encode_png(image[..., :2])


def test_rasterize_arrays_is_the_renderers_raster_on_numpy(ict_model, ict_decoder) -> None:
    """The fit's no-torch raster entry point gives exactly the renderer's triangle ids and compact covered pixels."""
    from facerecon.coefficients import Coefficients
    from facerecon.render.cpu import rasterize_arrays

    c = Coefficients.zeros(ict_model.layout, 1)
    with torch.no_grad():
        cam = ict_decoder(c).vertices_cam
    intr = ict_decoder.camera.intrinsics.scaled(0.5)
    ref = CPU.rasterize(cam, ict_model.triangles, intr)
    tid, pixels, verts, bary = rasterize_arrays(cam[0].double().numpy(), ict_model.triangles.numpy(), intr)
    assert torch.equal(torch.from_numpy(tid), ref.triangle_id[0])
    assert torch.equal(torch.from_numpy(pixels), ref.pixels)
    assert torch.equal(torch.from_numpy(verts), ref.pixel_vertices)
    np.testing.assert_allclose(bary, ref.pixel_barycentrics.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="indexes outside"):
        rasterize_arrays(cam[0].numpy(), np.array([[0, 1, 10**6]]), intr)

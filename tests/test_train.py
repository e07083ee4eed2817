"""Training: a tiny end-to-end R-Net run on CPU (loss goes down, resume continues, export loads), the skin GMM
trainer, and the augmentation's landmark bookkeeping."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facerecon.skin import GaussianMixture, SkinGMM
from facerecon.train import data as D
from facerecon.train import skin_gmm

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = Path("/work/shared/data/deep3d-examples")
FACE_MODEL = ROOT / "models" / "ict" / "facemodel.npz"


def test_mirror_index_is_an_involution() -> None:
    assert sorted(D.MIRROR_68.tolist()) == list(range(68))
    assert (D.MIRROR_68[D.MIRROR_68] == np.arange(68)).all()
    assert D.MIRROR_68[36] == 45 and D.MIRROR_68[39] == 42 and D.MIRROR_68[30] == 30 and D.MIRROR_68[48] == 54


def test_augment_moves_landmarks_with_the_image() -> None:
    """A bright dot at a landmark stays under that landmark (after flip re-indexing) through the augmentation."""
    rng = np.random.default_rng(3)
    img = torch.zeros(4, 3, 224, 224)
    lm = torch.tensor([80.0, 140.0]).expand(4, 68, 2).clone()  # u, v_up -> row 83, col 80 (every point there)
    img[:, :, 223 - 140, 80] = 1.0
    img = torch.nn.functional.avg_pool2d(img, 3, 1, 1) * 9  # a 3x3 blob
    out, _, lm2 = D.augment(img, torch.zeros(4, 1, 224, 224), lm, rng, flip=0.5)
    for b in range(4):
        u, v = lm2[b, 36].tolist()
        r, c = round(223 - v), round(u)
        peak = np.unravel_index(int(out[b, 0].argmax()), (224, 224))
        assert abs(peak[0] - r) <= 2 and abs(peak[1] - c) <= 2


def test_skin_gmm_em_recovers_a_known_mixture() -> None:
    rng = np.random.default_rng(0)
    means = np.array([[60.0, 110.0, 150.0], [160.0, 120.0, 135.0]])
    covs = np.array([np.diag([40.0, 9.0, 16.0]), np.diag([90.0, 4.0, 25.0])])
    n = (6000, 4000)
    x = np.concatenate([rng.multivariate_normal(m, c, size=k) for m, c, k in zip(means, covs, n, strict=True)])
    g = skin_gmm.fit_gmm(x, 2, seed=1, var_floor=0.0)
    assert np.allclose(g.weights, [0.6, 0.4], atol=0.02)
    assert np.allclose(g.means, means, atol=1.0)
    assert np.allclose(g.covariances, covs, rtol=0.15, atol=2.0)
    # a two-class naive Bayes built from it separates the classes
    gmm = SkinGMM(GaussianMixture(np.ones(1), means[:1], covs[:1]), GaussianMixture(np.ones(1), means[1:], covs[1:]))
    assert gmm.to_dict()["prior_skin"] == 0.8


def test_region_masks_are_disjoint_and_plausible() -> None:
    # the frontal mean face's landmarks are enough (no photo needed)
    from facerecon.coefficients import Coefficients
    from facerecon.decoder import FaceDecoder
    from facerecon.facemodel import FaceModel

    model = FaceModel.from_file(FACE_MODEL)
    lm68 = FaceDecoder(model)(Coefficients.zeros(model.layout, 1)).landmarks_2d[0].detach().numpy()
    skin, non = skin_gmm.region_masks(lm68)
    assert not (skin & non).any()
    assert 3000 < skin.sum() < 30000 and non.sum() > 10000


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from facerecon.train.loop import RNetConfig, train_rnet

    tmp = tmp_path_factory.mktemp("train")
    photos = tmp / "photos"
    photos.mkdir()
    for name in sorted(p.name for p in EXAMPLES.glob("*.jpg"))[:4]:
        shutil.copy(EXAMPLES / name, photos / name)
    models = tmp / "models" / "ict"
    models.mkdir(parents=True)
    for f in ("facemodel.npz", "facemodel.json", "mesh468.json"):
        (models / f).symlink_to(FACE_MODEL.parent / f)
    for f in ("rnet.onnx", "rnet.json"):  # copies: the export test below writes its own R-Net here
        shutil.copy(FACE_MODEL.parent / f, models / f)
    # a quarter of each batch from the 4 photos turned to large yaw (the shipped R-Net fits their sources)
    cfg = RNetConfig(data=[str(photos)], out=str(tmp / "run"), val_data=[], models_dir=str(tmp / "models"),
                     steps=8, batch=4, lr=2e-3, warmup=1, lr_final=1.0, synthetic=8, synthetic_val=8,
                     synthetic_fraction=0.5,
                     photo_per_batch=1, render_size=56, augment=False, val_every=0,
                     checkpoint_every=4, seed=0, threads=2, device="cpu", progress=False,
                     large_pose=4, large_pose_fraction=0.25, cache_dir=str(tmp / "cache"))
    torch.manual_seed(0)
    ckpt = train_rnet(cfg)
    return {"cfg": cfg, "ckpt": ckpt, "tmp": tmp}


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "losses.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_tiny_training_run_logs_every_term(tiny_run: dict[str, object]) -> None:
    """Every step logs finite losses with the photometric and perceptual terms active. (It used to assert that
    the landmark loss of the last two steps is below the first two's: with 8 steps on a stream whose batches
    alternate real and synthetic images that is a coin flip, and it flipped when the detector changed.)"""
    run = Path(tiny_run["cfg"].out)  # type: ignore[attr-defined]
    rows = _rows(run)
    assert len(rows) == 8
    assert all(math.isfinite(float(r["total"])) for r in rows)
    assert float(rows[0]["photo"]) > 0 and float(rows[0]["perceptual"]) > 0
    assert all(math.isfinite(float(r["lm_px_lp"])) for r in rows)  # the turned photos are in every batch
    pools = list((Path(tiny_run["tmp"]) / "cache").glob("largepose_*.npz"))  # type: ignore[arg-type]
    assert len(pools) == 1
    with np.load(pools[0], allow_pickle=False) as z:
        assert 1 <= len(z["yaw"]) <= 4 and (np.abs(z["yaw"]) >= 35).all() and (np.abs(z["yaw"]) <= 90).all()


def test_resume_continues_the_step_count(tiny_run: dict[str, object]) -> None:
    """A resumed run continues the step count; and the training call, which sets its own thread count (``threads=2``
    in the tiny run), gives the process's back on return: the engine in the same process relies on one thread
    for bit-reproducible reconstructions."""
    from facerecon.train.loop import RNetConfig, load_checkpoint, train_rnet

    cfg: RNetConfig = tiny_run["cfg"]  # type: ignore[assignment]
    more = RNetConfig(**{**cfg.__dict__, "steps": 9})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ckpt = train_rnet(more, resume=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert load_checkpoint(ckpt)["step"] == 9
    rows = _rows(Path(cfg.out))
    assert [int(r["step"]) for r in rows] == list(range(1, 10))


def test_the_anchor_holds_the_starting_networks_landmarks(tiny_run: dict[str, object]) -> None:
    """``anchor_weight``: a frozen copy of the starting network gives the real rows' landmark targets. At the first
    step the student is that network, so the term is zero (to float precision; its landmarks are tens of pixels
    from the labels, so the landmark term is not); after a few large steps it is not; without a starting network
    it is refused."""
    from facerecon.train.loop import RNetConfig, train_rnet

    cfg: RNetConfig = tiny_run["cfg"]  # type: ignore[assignment]
    shipped = str(FACE_MODEL.parent / "rnet.onnx")  # the repository's (the export test rewrites the run's copy)
    out = Path(tiny_run["tmp"]) / "anchored"  # type: ignore[arg-type]
    run = RNetConfig(**{**cfg.__dict__, "out": str(out), "steps": 3, "large_pose": 0, "init_from": shipped,
                        "anchor_weight": 1.0, "photo_per_batch": 0, "lr": 5e-3})
    train_rnet(run)
    rows = _rows(out)
    assert len(rows) == 3
    assert float(rows[0]["anchor"]) < 1e-6 < float(rows[0]["landmark"])
    assert float(rows[-1]["anchor"]) > 1e-3
    with pytest.raises(ValueError, match="init_from"):
        train_rnet(RNetConfig(**{**run.__dict__, "init_from": "", "out": str(out / "none")}))


def test_vertex_loss_matches_the_geometry() -> None:
    """``vertex_loss`` against closed forms on the real face model: zero for equal coefficients; one identity
    coefficient off by ``d`` (no rotation) gives ``d^2`` times the mean squared length of that basis vector over the
    kept face-region vertices; a pure yaw ``t`` of the mean face gives the mean of ``2 (1 - cos t) (x^2 + z^2)``."""
    from facerecon.coefficients import Coefficients
    from facerecon.facemodel import FaceModel
    from facerecon.train.rnet import VERTEX_STRIDE, vertex_bases, vertex_loss

    model = FaceModel.from_file(FACE_MODEL)
    bases = vertex_bases(model)
    lay = model.layout
    zero = Coefficients.from_vector(torch.zeros(1, lay.total), lay)
    assert float(vertex_loss(zero, zero, bases)) == 0.0
    data = np.load(FACE_MODEL)
    keep = np.flatnonzero(data["face_mask"])[::VERTEX_STRIDE]
    cm = 10.0  # the ICT model's decimetres
    k, d = 3, 0.7
    vec = torch.zeros(1, lay.total)
    vec[0, k] = d
    off = Coefficients.from_vector(vec, lay)
    basis_k = data["id_basis"].reshape(lay.id, -1, 3)[k, keep].astype(np.float64) * cm
    expect = d ** 2 * (basis_k ** 2).sum(-1).mean()
    assert float(vertex_loss(off, zero, bases)) == pytest.approx(expect, rel=1e-4)
    t = math.radians(25.0)
    yaw = torch.zeros(1, lay.total)
    yaw[0, lay.id + lay.exp + lay.tex + 1] = t  # angle = (pitch, yaw, roll)
    v = data["mean_shape"][keep].astype(np.float64) * cm
    expect = (2 * (1 - math.cos(t)) * (v[:, 0] ** 2 + v[:, 2] ** 2)).mean()
    assert float(vertex_loss(Coefficients.from_vector(yaw, lay), zero, bases)) == pytest.approx(expect, rel=1e-4)


def test_the_vertex_term_trains(tiny_run: dict[str, object]) -> None:
    """``vertex_weight``: the dense term is logged (positive: a tiny network is far from the true surfaces), off by
    default, and the validation reports the held-out renders' surface error in mm."""
    from facerecon.train.loop import RNetConfig, train_rnet

    cfg: RNetConfig = tiny_run["cfg"]  # type: ignore[assignment]
    out = Path(tiny_run["tmp"]) / "dense"  # type: ignore[arg-type]
    train_rnet(RNetConfig(**{**cfg.__dict__, "out": str(out), "steps": 2, "vertex_weight": 0.2, "val_every": 2}))
    rows = _rows(out)
    assert len(rows) == 2 and all(float(r["vertex"]) > 0 for r in rows)
    assert all(float(r["vertex"]) == 0 for r in _rows(Path(cfg.out)))
    val = (out / "val.csv").read_text()
    assert "syn_vertex_mm" in val


def test_the_face_mesh_term_trains(tiny_run: dict[str, object]) -> None:
    """``mesh_weight``: the face mesh's targets are made for the training crops (cached with the run's data) and the
    term is logged on the real rows (positive: the tiny network is far from them); off by default."""
    from facerecon.train.loop import RNetConfig, train_rnet

    cfg: RNetConfig = tiny_run["cfg"]  # type: ignore[assignment]
    out = Path(tiny_run["tmp"]) / "mesh"  # type: ignore[arg-type]
    train_rnet(RNetConfig(**{**cfg.__dict__, "out": str(out), "steps": 2, "mesh_weight": 1.0, "large_pose": 0}))
    rows = _rows(out)
    assert len(rows) == 2 and all(float(r["mesh"]) > 0 for r in rows)
    assert all(float(r["mesh"]) == 0 for r in _rows(Path(cfg.out)))
    assert list(Path(cfg.cache_dir).glob("mesh468_*.npz"))


def test_export_onnx_loads_in_onnxnet(tiny_run: dict[str, object]) -> None:
    from facerecon.nets.runtime import OnnxNet
    from facerecon.train.export import export_run
    from facerecon.train.loop import load_rnet

    cfg = tiny_run["cfg"]
    cards = export_run(Path(cfg.out))  # type: ignore[attr-defined]
    assert cards[0].kind == "rnet" and cards[0].onnx.max_abs_diff_vs_torch is not None
    npz = Path(cfg.models_dir) / "ict" / "facemodel.npz"  # type: ignore[attr-defined]
    net = OnnxNet.for_face_model(npz, "rnet", device="cpu")
    x = np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
    out = net.run(x)["coeffs"]
    torch_net, *_ = load_rnet(Path(cfg.out))  # type: ignore[attr-defined]
    with torch.no_grad():
        ref = torch_net(torch.from_numpy(x)).numpy()
    assert out.shape == (2, 218)
    assert np.abs(out - ref).max() < 5e-2 * max(1.0, float(np.abs(ref).max()))


def test_rnet_trunk_size_keeps_the_224_input() -> None:
    from facerecon.coefficients import CoefficientLayout
    from facerecon.nets.rnet import ReconNet

    lay = CoefficientLayout(id=4, exp=3, tex=2, angle=3, gamma=27, trans=3)
    x = torch.rand(2, 3, 224, 224)
    small = ReconNet(lay, "resnet18", trunk_size=112).eval()
    assert small(x).shape == (2, lay.total)
    assert ReconNet(lay, "resnet18").trunk_size == 224  # the default changes nothing
    with pytest.raises(ValueError):
        ReconNet(lay, "resnet18", trunk_size=8)


def test_identity_labels_and_the_fixed_holdout() -> None:
    assert D.identity_from_name(Path("lfw/Aaron_Peirsol_0002.jpg")) == "Aaron_Peirsol"
    assert D.identity_from_name(Path("cfp/images/train/017/profile/03.jpg")) == "cfp017"
    assert D.identity_from_name(Path("misc/photo.jpg")) == ""
    # a fixed 10 % of people, the same in every run and every evaluation (sha1 of the label)
    people = [f"person_{i}" for i in range(2000)]
    share = np.mean([D.is_validation_person(p) for p in people])
    assert 0.08 < share < 0.12
    assert not D.is_validation_person("")
    assert D.is_validation_photo("/x/afw_helen/images/afw/1_1.jpg", "") and \
        D.is_validation_photo("/x/afw_helen/images/helen_testset/1_1.jpg", "")
    assert not D.is_validation_photo("/x/afw_helen/images/helen_trainset/1_1.jpg", "")


def test_given_landmarks_are_targets_in_the_detectors_crop(tmp_path: Path) -> None:
    """A photo with annotated landmarks is cropped from the detector's face (as at inference) and its annotation
    is mapped into that crop; the detector's yaw is kept."""
    from facerecon.detect import FaceDetector, select_faces
    from facerecon.facemodel import FaceModel
    from facerecon.pipeline import prepare_face

    src = Path("/work/shared/data/faces-train/afw_helen")
    with open(src / "landmarks_68.csv", newline="") as fh:
        rows = [r for r in csv.reader(fh)][1:]
    rows = [r for r in rows if r[0].startswith("helen_trainset/")][:2]
    (tmp_path / "images" / "helen_trainset").mkdir(parents=True)
    with open(tmp_path / "landmarks_68.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", *[f"{a}{i}" for i in range(68) for a in "xy"]])
        for r in rows:
            shutil.copy(src / "images" / r[0], tmp_path / "images" / r[0])
            w.writerow(r)
    model = FaceModel.from_file(FACE_MODEL)
    entries = D.list_photos([tmp_path])
    assert len(entries) == 2 and all(e.lm68 is not None for e in entries)
    real = D.build_real_cache(entries, tmp_path / "cache", model.standard_lm5)
    assert len(real) == 2 and real.given.all() and np.isfinite(real.yaw).all()
    det = FaceDetector()
    for i, e in enumerate(entries):
        img = np.asarray(Image.open(e.path).convert("RGB"))
        face = select_faces(det.detect(img, "largest"), "largest")[0]
        p = prepare_face(img, face, model.standard_lm5)
        assert np.array_equal(real.images[i], p.crop)
        assert np.allclose(real.lm68[i], p.alignment.to_crop(e.lm68.astype(np.float64)), atol=1e-3)
        # the stored transform rebuilds the crop's mapping (later annotations can be mapped into the crop)
        from facerecon.align import Alignment

        rebuilt = Alignment.from_params(*real.params[i])
        assert np.allclose(rebuilt.to_crop(e.lm68.astype(np.float64)), real.lm68[i], atol=1e-3)
    again = D.build_real_cache(entries, tmp_path / "cache", model.standard_lm5)  # from the cache, same arrays
    assert np.array_equal(again.images, real.images) and np.allclose(again.yaw, real.yaw)
    both = D.RealSet.concat([real, again])
    assert len(both) == 4 and both.paths[2] == real.paths[0]


def test_profile_fiducials_replace_the_visible_side_and_mute_the_hidden_one() -> None:
    """A CFP profile's manual fiducials become the targets of their 5 iBUG points in the crop, mapped through the
    crop's stored transform; the hidden side's points get weight 0; flips keep weights with their points."""
    from facerecon.align import Alignment

    n = 2
    pts = np.zeros((30, 2), np.float32)
    pts[:, 0] = np.linspace(100, 160, 30)  # ear (0) left of the nose tip (21): looks towards the image's right
    pts[:, 1] = np.linspace(80, 200, 30)
    params = np.array([[300, 300, 102 / 150, 150.0, 150.0]] * n)
    real = D.RealSet(np.zeros((n, 224, 224, 3), np.uint8), np.zeros((n, 68, 2), np.float32),
                     np.zeros((n, 224, 224), np.uint8), ["cfp001"] * n, ["/d/cfp/a.jpg", "/d/cfp/b.jpg"],
                     np.zeros(n, bool), None, params)
    fid = {str(Path("/d/cfp/a.jpg").resolve()): ("profile", pts), str(Path("/d/cfp/b.jpg").resolve()): ("frontal", pts)}
    assert D.apply_profile_fiducials(real, fid) == 1
    al = Alignment.from_params(*params[0])
    assert np.allclose(real.lm68[0, 36], al.to_crop(pts[12:13].astype(np.float64))[0], atol=1e-4)
    assert np.allclose(real.lm68[0, 30], al.to_crop(pts[21:22].astype(np.float64))[0], atol=1e-4)
    assert real.lm_weight[0, 45] == 0 and real.lm_weight[0, 36] == 1 and real.lm_weight[0, 30] == 1
    assert (real.lm_weight[1] == 1).all() and (real.lm68[1] == 0).all()  # the frontal photo is untouched
    w = torch.from_numpy(real.lm_weight[:1]).repeat(4, 1)
    lm = torch.from_numpy(real.lm68[:1]).repeat(4, 1, 1)
    _, _, _, w2 = D.augment(torch.zeros(4, 3, 224, 224), torch.zeros(4, 1, 224, 224), lm, np.random.default_rng(0),
                            flip=1.0, lm_weight=w)
    assert (w2[:, 36] == 0).all() and (w2[:, 45] == 1).all()


def test_shipped_rnet_onnx_loads_back_into_torch_for_training() -> None:
    """Training continues from the shipped weights on a machine without the run's checkpoint: the fp16 ONNX file's
    weights go back into the torch network, which then reproduces the service's own runtime (OnnxNet) on real
    crops; the freshly built network (pretrained trunk, zero heads) does not."""
    from facerecon.nets.rnet import ReconNet
    from facerecon.nets.runtime import OnnxNet
    from facerecon.train.checkpoints import load_rnet_onnx_weights

    onnx_path = FACE_MODEL.parent / "rnet.onnx"
    card = OnnxNet.for_face_model(FACE_MODEL, "rnet", device="cpu")
    layout = card.card.layout
    net = ReconNet(layout, backbone="facemesh", trunk_size=192).eval()
    crops = np.stack([np.asarray(Image.open(p).convert("RGB").resize((224, 224)))
                      for p in sorted(EXAMPLES.glob("*.jpg"))[:3]])
    x = crops.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    ref = card.run(x)["coeffs"]
    with torch.no_grad():
        fresh = net(torch.from_numpy(x)).numpy()
    assert np.abs(fresh - ref).max() > 0.1
    load_rnet_onnx_weights(net, onnx_path)
    with torch.no_grad():
        out = net.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(out - ref).max() < 1e-2 * max(1.0, float(np.abs(ref).max()))


def test_average_runs_is_the_weighted_mean_of_the_weights(tiny_run: dict[str, object], tmp_path: Path) -> None:
    """``train average``: the averaged checkpoint is the weighted mean, weight for weight (a run averaged with a
    perturbed copy of itself lands between them), and a bad weight list is refused."""
    from facerecon.train.checkpoints import average_runs, load_checkpoint

    run = Path(tiny_run["cfg"].out)  # type: ignore[attr-defined]
    other = tmp_path / "other"
    other.mkdir()
    state = load_checkpoint(run / "checkpoint.pt")
    moved = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in state["model"].items()}
    torch.save({"model": moved, "optimizer": {}, "step": 3}, other / "checkpoint.pt")
    shutil.copy(run / "config.json", other / "config.json")
    ckpt = average_runs([run, other], [0.75, 0.25], tmp_path / "avg")
    avg = load_checkpoint(ckpt)["model"]
    for k, v in state["model"].items():
        if v.is_floating_point():
            assert torch.allclose(avg[k], v + 0.25, atol=1e-5), k
    with pytest.raises(ValueError):
        average_runs([run, other], [0.5, 0.6], tmp_path / "bad")


def test_manual_rows_get_their_landmark_weight_scaled() -> None:
    """``manual_landmark_weight``: only photos whose given landmarks come from the manual-label folder change."""
    from facerecon.train import data as D
    from facerecon.train.rnet import weight_manual_rows

    n = 4
    paths = ["/d/faces-train/afw_helen/images/helen_trainset/a.jpg", "/d/faces-train/afw_helen/images/x/b.jpg",
             "/d/faces-train/ytf_68pt/c.jpg", "/d/faces-train/lfw/afw_helen_fan.jpg"]
    real = D.RealSet(images=np.zeros((n, 224, 224, 3), np.uint8), lm68=np.zeros((n, 68, 2), np.float32),
                     skin=np.zeros((n, 224, 224), np.uint8), identity=["a", "b", "c", "d"], paths=paths,
                     given=np.array([True, False, True, True]), lm_weight=np.ones((n, 68), np.float32))
    real.lm_weight[0, :17] = 0.0
    assert weight_manual_rows(real, 3.0) == 1
    assert (real.lm_weight[0, 17:] == 3.0).all() and (real.lm_weight[0, :17] == 0.0).all()
    assert (real.lm_weight[1:] == 1.0).all()  # not given, another folder, a file name that only looks alike

"""R-Net, C-Net, ONNX export + runtime, official-checkpoint import (facerecon.nets)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from facerecon.coefficients import BFM_LAYOUT, CoefficientLayout, Coefficients
from facerecon.errors import ModelFileError
from facerecon.nets.cards import CardInfo, FaceModelRef, NetworkProvenance
from facerecon.nets.checkpoint import (
    OFFICIAL_N_KEYS,
    OFFICIAL_N_PARAMS,
    import_official,
    load_official,
    read_official_state_dict,
)
from facerecon.nets.cnet import ConfidenceNet, aggregate, aggregate_set
from facerecon.nets.onnx_io import export_cnet, export_rnet, read_embedded_card
from facerecon.nets.resnet import load_torchvision_weights, resnet18, resnet50
from facerecon.nets.rnet import ReconNet
from facerecon.nets.runtime import OnnxNet, check_pair, compress_network

SMALL = CoefficientLayout(id=20, exp=10, tex=12)
FM_SHA = "ab" * 32


def _info(**kw: object) -> CardInfo:
    base: dict[str, object] = dict(
        description="test network (random weights)",
        face_model=FaceModelRef(name="bfm", sha256=FM_SHA),
        licence="MIT",
        licence_notice="test",
        redistributable=False,
        provenance=NetworkProvenance(source="random init, tests/test_nets.py"),
    )
    base.update(kw)
    return CardInfo.model_validate(base)


def _images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _randomise_heads(net: ReconNet, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in net.final_layers:
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.05)
            head.bias.copy_(torch.randn(head.bias.shape, generator=gen) * 0.1)


def _randomise_last(cnet: ConfidenceNet, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cnet.final_layer.weight.copy_(torch.randn(cnet.final_layer.weight.shape, generator=gen) * 0.2)
        cnet.final_layer.bias.copy_(torch.randn(cnet.final_layer.bias.shape, generator=gen) * 0.2)


# --------------------------------------------------------------------------------------------------- torch modules


def test_resnet_names_and_sizes_match_torchvision() -> None:
    r50 = resnet50().state_dict()
    assert len(r50) == 318 and not any(k.startswith("fc.") for k in r50)
    assert sum(v.numel() for k, v in r50.items() if "running" not in k and "num_batches" not in k) == 23_508_032
    for key in (
        "conv1.weight",
        "bn1.num_batches_tracked",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer4.2.conv3.weight",
        "layer4.2.bn3.bias",
    ):
        assert key in r50
    assert r50["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: stride on the 3x3
    assert resnet50().layer2[0].conv2.stride == (2, 2) and resnet50().layer2[0].conv1.stride == (1, 1)
    r18 = resnet18()
    assert r18.feature_dim == 512 and "layer2.0.downsample.0.weight" in r18.state_dict()
    assert r18.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 512, 1, 1)


def test_torchvision_style_weights_load_without_fc(tmp_path: Path) -> None:
    src = resnet18().state_dict()
    src["fc.weight"], src["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(src, tmp_path / "resnet18-imagenet.pth")
    dst = resnet18()
    load_torchvision_weights(dst, tmp_path / "resnet18-imagenet.pth")
    assert torch.equal(dst.layer4[1].conv2.weight, src["layer4.1.conv2.weight"])
    with pytest.raises(ModelFileError, match="do not fit"):
        load_torchvision_weights(resnet50(), tmp_path / "resnet18-imagenet.pth")


def test_official_key_and_parameter_counts() -> None:
    net = ReconNet(BFM_LAYOUT, "resnet50")
    sd = net.state_dict()
    assert len(sd) == OFFICIAL_N_KEYS == 332
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL_N_PARAMS == 24_034_625
    assert [tuple(sd[f"final_layers.{i}.weight"].shape) for i in range(7)] == [
        (k, 2048, 1, 1) for k in (80, 64, 80, 3, 27, 2, 1)
    ]


def test_fresh_rnet_predicts_the_mean_face_exactly() -> None:
    net = ReconNet(SMALL, "resnet18").eval()
    coeffs, feats = net.forward_with_features(_images(2))
    assert coeffs.shape == (2, SMALL.total) and feats.shape == (2, 512)
    assert torch.count_nonzero(coeffs) == 0 and torch.count_nonzero(feats) > 0
    c = net.predict(_images(1))
    assert isinstance(c, Coefficients) and c.layout == SMALL
    with pytest.raises(ValueError, match="RGB image batch"):
        net(torch.rand(1, 224, 224, 3))


def test_untrained_cnet_is_exact_mean_pooling() -> None:
    cnet = ConfidenceNet(SMALL, 512).eval()
    conf_id, conf_tex = cnet(_images(3), torch.rand(3, 512))
    assert torch.equal(conf_id, torch.ones(3, SMALL.id)) and torch.equal(conf_tex, torch.ones(3, SMALL.tex))
    ids, tex = torch.randn(3, SMALL.id), torch.randn(3, SMALL.tex)
    id_agg, tex_agg = aggregate(ids, tex, conf_id, conf_tex)
    assert torch.equal(id_agg, ids.sum(0) / 3) and torch.equal(tex_agg, tex.sum(0) / 3)
    torch.testing.assert_close(id_agg, ids.mean(0))


def test_aggregate_is_the_confidence_weighted_mean_and_order_invariant() -> None:
    """``sum_j c_j a_j / sum_j c_j`` per coefficient, against numpy, with confidences that differ between images and
    between coefficients. (It used to check that one image repeated aggregates to itself, through a random R-Net and
    C-Net: that holds for any weights by construction and said nothing of them.)"""
    gen = torch.Generator().manual_seed(3)
    ids, tex = torch.randn(5, SMALL.id, generator=gen), torch.randn(5, SMALL.tex, generator=gen)
    c_id, c_tex = torch.rand(5, SMALL.id, generator=gen) + 0.1, torch.rand(5, SMALL.tex, generator=gen) + 0.1
    ref = aggregate(ids, tex, c_id, c_tex)
    for agg, a, c in ((ref[0], ids, c_id), (ref[1], tex, c_tex)):
        want = (c.numpy() * a.numpy()).sum(0) / c.numpy().sum(0)
        np.testing.assert_allclose(agg.numpy(), want, rtol=1e-5, atol=1e-6)
        assert np.abs(want - a.numpy().mean(0)).max() > 0.05  # the weights matter here: not the plain mean
    for _ in range(3):
        p = torch.randperm(5, generator=gen)
        got = aggregate(ids[p], tex[p], c_id[p], c_tex[p])
        torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=0)
    coeffs = Coefficients.from_vector(torch.randn(5, SMALL.total, generator=gen), SMALL)
    coeffs = Coefficients(ids, coeffs.exp, tex, coeffs.angle, coeffs.gamma, coeffs.trans)
    merged = aggregate_set(coeffs, c_id, c_tex)
    torch.testing.assert_close(merged.id, ref[0].expand(5, -1))
    torch.testing.assert_close(merged.tex, ref[1].expand(5, -1))
    assert torch.equal(merged.exp, coeffs.exp) and torch.equal(merged.angle, coeffs.angle)


def test_aggregate_set_keeps_pose_expression_lighting_per_image() -> None:
    coeffs = Coefficients.from_vector(torch.randn(4, SMALL.total), SMALL)
    merged = aggregate_set(coeffs, torch.ones(4, SMALL.id), torch.ones(4, SMALL.tex), albedo=False)
    torch.testing.assert_close(merged.id, coeffs.id.mean(0).expand(4, -1))
    assert torch.equal(merged.tex, coeffs.tex) and torch.equal(merged.gamma, coeffs.gamma)


# --------------------------------------------------------------------------------------------------- ONNX + runtime


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One R-Net (ResNet-18, random heads) and its C-Net, exported once for the module."""
    out = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    rnet = ReconNet(SMALL, "resnet18").eval()
    _randomise_heads(rnet)
    rcard = export_rnet(rnet, out / "rnet.onnx", _info())
    assert not rnet.training  # export restores the mode
    cnet = ConfidenceNet(SMALL, rnet.feature_dim).eval()
    _randomise_last(cnet)
    ccard = export_cnet(cnet, out / "cnet.onnx", _info(paired_rnet_sha256=rcard.sha256), backbone="resnet18")
    return {"dir": out, "rnet": rnet, "cnet": cnet, "rcard": rcard, "ccard": ccard}


def test_card_contents(exported: dict) -> None:
    out: Path = exported["dir"]
    card = json.loads((out / "rnet.json").read_text())
    assert card["kind"] == "rnet" and card["backbone"] == "resnet18" and card["feature_dim"] == 512
    assert card["image"]["channel_order"] == "RGB" and "none" in card["image"]["normalisation"]
    assert card["layout"] == SMALL.model_dump() and card["face_model"] == {"name": "bfm", "sha256": FM_SHA}
    assert card["bytes"] == (out / "rnet.onnx").stat().st_size and len(card["sha256"]) == 64
    assert card["onnx"]["opset"] == 17 and card["onnx"]["weights_dtype"] == "float32"
    assert card["onnx"]["max_abs_diff_vs_torch"] < 1e-4
    assert [o["name"] for o in card["outputs"]] == ["coeffs", "features"]
    assert card["outputs"][0]["shape"] == ["batch", SMALL.total]
    embedded = read_embedded_card(out / "rnet.onnx")
    assert embedded.layout == SMALL and embedded.sha256 is None


def test_rnet_onnx_matches_torch_with_dynamic_batch(exported: dict) -> None:
    net = OnnxNet(exported["dir"] / "rnet.json", kind="rnet", expected_layout=SMALL, intra_op_threads=2)
    assert net.providers == ["CPUExecutionProvider"]
    for b in (1, 3):
        x = _images(b, seed=10 + b)
        got = net.run(x.numpy())
        with torch.no_grad():
            coeffs, feats = exported["rnet"].forward_with_features(x)
        assert got["coeffs"].shape == (b, SMALL.total) and got["coeffs"].dtype == np.float32
        assert np.abs(coeffs.numpy()).max() > 0.1  # non-trivial outputs
        assert np.abs(got["coeffs"] - coeffs.numpy()).max() < 1e-4
        assert np.abs(got["features"] - feats.numpy()).max() < 1e-4


def test_cnet_onnx_matches_torch_with_dynamic_batch(exported: dict) -> None:
    rnet = OnnxNet(exported["dir"] / "rnet.json")
    cnet = OnnxNet(exported["dir"] / "cnet.json", kind="cnet", expected_layout=SMALL)
    check_pair(rnet, cnet)
    for b in (1, 3):
        x = _images(b, seed=20 + b)
        feats = torch.rand(b, 512, generator=torch.Generator().manual_seed(b))
        got = cnet.run(x.numpy(), feats.numpy())
        with torch.no_grad():
            conf_id, conf_tex = exported["cnet"](x, feats)
        assert got["conf_id"].shape == (b, SMALL.id) and got["conf_tex"].shape == (b, SMALL.tex)
        assert (got["conf_id"] > 0).all() and conf_id.std() > 0.01
        assert np.abs(got["conf_id"] - conf_id.numpy()).max() < 1e-4
        assert np.abs(got["conf_tex"] - conf_tex.numpy()).max() < 1e-4
    with pytest.raises(ValueError, match="features"):
        cnet.run(_images(1).numpy())


def _copy(exported: dict, dst: Path, kind: str = "rnet") -> Path:
    for suffix in (".onnx", ".json"):
        shutil.copy(exported["dir"] / f"{kind}{suffix}", dst / f"{kind}{suffix}")
    return dst / f"{kind}.json"


def test_runtime_refuses_missing_corrupt_and_mismatched_files(exported: dict, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        OnnxNet(tmp_path / "rnet.json")
    card = _copy(exported, tmp_path)
    (tmp_path / "rnet.onnx").unlink()
    with pytest.raises(ModelFileError, match="missing"):
        OnnxNet(card)
    card = _copy(exported, tmp_path)
    raw = bytearray((tmp_path / "rnet.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped
    (tmp_path / "rnet.onnx").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="sha256"):
        OnnxNet(card)
    (tmp_path / "rnet.onnx").write_bytes(bytes(raw[:1000]))
    with pytest.raises(ModelFileError, match="bytes"):
        OnnxNet(card)
    card = _copy(exported, tmp_path)
    with pytest.raises(ModelFileError, match="coefficient layout"):
        OnnxNet(card, expected_layout=BFM_LAYOUT)
    with pytest.raises(ModelFileError, match="face model 'bfm', not 'ict'"):
        OnnxNet(card, face_model_name="ict")
    with pytest.raises(ModelFileError, match="is a rnet, expected a cnet"):
        OnnxNet(card, kind="cnet")
    with pytest.raises(ModelFileError, match="sha256"):
        OnnxNet(card, face_model_sha256="cd" * 32, strict_face_model=True)
    OnnxNet(card, face_model_sha256="cd" * 32)  # same layout and name: warns only
    # A side-car edited to claim another layout: caught by the card embedded in the file.
    data = json.loads(card.read_text())
    data["layout"]["id"] = 21
    card.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="embedded"):
        OnnxNet(card)
    card.write_text("{not json")
    with pytest.raises(ModelFileError, match="invalid"):
        OnnxNet(card)


def test_xz_stored_network_runs_identically_and_is_checked(exported: dict, tmp_path: Path) -> None:
    """A network stored as ``.onnx.xz`` runs as the plain file did, and a corrupt archive is refused. The C-Net: the
    storage is the same for either kind, and xz -9e of the 45 MB ResNet-18 R-Net alone took ~30 s of the suite."""
    card = _copy(exported, tmp_path, "cnet")
    x = _images(2, seed=5).numpy()
    feats = np.random.default_rng(5).random((2, 512), dtype=np.float32)
    plain = OnnxNet(card).run(x, feats)["conf_id"]
    packed = compress_network(tmp_path / "cnet.onnx")
    assert packed.name == "cnet.onnx.xz" and not (tmp_path / "cnet.onnx").exists()
    np.testing.assert_array_equal(OnnxNet(card).run(x, feats)["conf_id"], plain)
    raw = bytearray(packed.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    packed.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"xz|sha256|bytes"):
        OnnxNet(card)


def test_shipped_networks_fit_the_per_file_size_limit() -> None:
    shipped = Path(__file__).resolve().parents[1] / "models" / "ict"
    for path in shipped.glob("*net.onnx*"):
        assert path.stat().st_size < 20 * 1024 * 1024, f"{path.name} is over 20 MiB"


def test_network_beside_a_face_model_is_checked_against_its_card(exported: dict, tmp_path: Path) -> None:
    _copy(exported, tmp_path)
    fm_card = {"name": "bfm", "layout": SMALL.model_dump(), "sha256": FM_SHA}
    (tmp_path / "facemodel.json").write_text(json.dumps(fm_card))
    net = OnnxNet.for_face_model(tmp_path / "facemodel.npz", "rnet", device="cpu")
    assert net.kind == "rnet" and net.layout == SMALL
    with pytest.raises(ValueError, match="expected images"):
        net.run(np.zeros((1, 224, 224, 3), np.float32))
    fm_card["layout"] = BFM_LAYOUT.model_dump()
    (tmp_path / "facemodel.json").write_text(json.dumps(fm_card))
    with pytest.raises(ModelFileError, match="coefficient layout"):
        OnnxNet.for_face_model(tmp_path / "facemodel.npz")
    with pytest.raises(ModelFileError, match="not found"):
        OnnxNet.for_face_model(tmp_path / "facemodel.npz", "cnet")


def test_cnet_paired_with_another_rnet_is_refused(exported: dict, tmp_path: Path) -> None:
    rnet = OnnxNet(exported["dir"] / "rnet.json")
    card = _copy(exported, tmp_path, "cnet")
    data = json.loads(card.read_text())
    data["paired_rnet_sha256"] = "ef" * 32
    card.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="trained on the features"):
        check_pair(rnet, OnnxNet(card))


def test_fp16_weights_halve_the_file_and_still_run_on_cpu(tmp_path: Path) -> None:
    cnet = ConfidenceNet(SMALL, 512).eval()
    _randomise_last(cnet)
    c32 = export_cnet(cnet, tmp_path / "a" / "cnet.onnx", _info(), backbone="resnet18")
    c16 = export_cnet(cnet, tmp_path / "b" / "cnet.onnx", _info(), backbone="resnet18", weights_fp16=True)
    assert c16.onnx.weights_dtype == "float16" and c16.bytes < 0.6 * c32.bytes
    assert c16.onnx.max_abs_diff_vs_torch is not None and c16.onnx.max_abs_diff_vs_torch < 1e-2
    out = OnnxNet(tmp_path / "b" / "cnet.json").run(_images(2).numpy(), np.random.rand(2, 512).astype(np.float32))
    assert np.isfinite(out["conf_id"]).all()


# --------------------------------------------------------------------------------------------------- checkpoint


class _Payload:
    """Stands for arbitrary code in a pickle: unpickling it would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (Path(self.marker),))


def _official_like(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with exactly the official keys, shapes and dtypes, random values."""
    with torch.device("meta"):
        ref = ReconNet(BFM_LAYOUT, "resnet50").state_dict()
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for k, v in ref.items():
        if not v.is_floating_point():
            sd[k] = torch.tensor(1000, dtype=v.dtype)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=gen) + 0.5
        elif k.endswith("weight") and v.ndim == 1:  # BN scale
            sd[k] = torch.rand(v.shape, generator=gen) * 0.5 + 0.5
        else:
            fan_in = max(1, int(np.prod(v.shape[1:])))
            sd[k] = torch.randn(v.shape, generator=gen) * (1.0 / fan_in) ** 0.5 * (1.0 if v.ndim > 1 else 0.1)
    return sd


def _save_official(sd: dict[str, torch.Tensor], path: Path, **extra: object) -> Path:
    blob: dict[str, object] = {
        "net_recon": sd,
        "opt_00": {
            "state": {},
            "param_groups": [
                {
                    "lr": 1e-4,
                    "betas": (0.9, 0.999),
                    "eps": 1e-8,
                    "weight_decay": 0,
                    "amsgrad": False,
                    "params": [0, 1, 2],
                }
            ],
        },
        "sched_00": {"step_size": 10, "gamma": 0.2, "base_lrs": [1e-4], "last_epoch": 20, "_step_count": 21},
    }
    blob.update(extra)
    torch.save(blob, path)
    return path


@pytest.fixture(scope="module")
def official_sd() -> dict[str, torch.Tensor]:
    return _official_like()


@pytest.mark.slow
def test_import_official_checkpoint_reproduces_torch(official_sd: dict, tmp_path: Path) -> None:
    assert len(official_sd) == 332
    assert sum(v.numel() for k, v in official_sd.items() if "running" not in k and "num_batches" not in k) == (
        24_034_625
    )
    ckpt = _save_official(official_sd, tmp_path / "epoch_20.pth")
    card_path = import_official(ckpt, tmp_path / "bfm")
    card = json.loads(card_path.read_text())
    assert card["backbone"] == "resnet50" and card["layout"] == BFM_LAYOUT.model_dump()
    assert card["redistributable"] is False and "non-commercial" in card["licence_notice"]
    assert card["provenance"]["source_files"] == {"epoch_20.pth": card["provenance"]["source_files"]["epoch_20.pth"]}
    with torch.device("meta"):
        torch_net = ReconNet(BFM_LAYOUT, "resnet50")
    torch_net.load_state_dict(official_sd, assign=True)  # the plain torch model with the same tensors
    torch_net.eval()
    x = _images(1, seed=5)
    with torch.no_grad():
        want = torch_net(x).numpy()
    got = OnnxNet(card_path, expected_layout=BFM_LAYOUT, face_model_name="bfm").run(x.numpy())["coeffs"]
    assert np.abs(want).max() > 0.1
    assert np.abs(got - want).max() < 1e-4


def test_official_checkpoint_with_module_prefix_loads(official_sd: dict, tmp_path: Path) -> None:
    sd = {f"module.{k}": v for k, v in official_sd.items()}
    got = read_official_state_dict(_save_official(sd, tmp_path / "ddp.pth"))
    assert set(got) == set(official_sd)


def test_tampered_checkpoints_fail_clearly(official_sd: dict, tmp_path: Path) -> None:
    sd = dict(official_sd)
    del sd["backbone.layer3.2.bn2.running_mean"]
    with pytest.raises(ModelFileError, match=r"1 missing keys \['backbone.layer3.2.bn2.running_mean'\]"):
        load_official(_save_official(sd, tmp_path / "missing.pth"))
    sd = dict(official_sd)
    sd["final_layers.0.weight"] = torch.zeros(100, 2048, 1, 1)
    sd["final_layers.0.bias"] = torch.zeros(100)
    with pytest.raises(ModelFileError, match=r"heads are \[100, 64, 80, 3, 27, 2, 1\] \(total 277\).*257"):
        load_official(_save_official(sd, tmp_path / "heads.pth"))
    sd = dict(official_sd)
    sd["backbone.fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ModelFileError, match="unexpected keys"):
        load_official(_save_official(sd, tmp_path / "fc.pth"))
    sd = dict(official_sd)
    sd["backbone.conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ModelFileError, match="wrong shape"):
        load_official(_save_official(sd, tmp_path / "shape.pth"))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((tmp_path / "shape.pth").read_bytes()[:4096])
    with pytest.raises(ModelFileError, match="unreadable or truncated"):
        load_official(truncated)
    with pytest.raises(ModelFileError, match="not found"):
        load_official(tmp_path / "nope.pth")


def test_weights_only_refuses_a_checkpoint_carrying_objects(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth"
    torch.save({"net_recon": {"backbone.conv1.weight": torch.zeros(1)}, "opt_00": _Payload(str(marker))}, ckpt)
    with pytest.raises(ModelFileError, match="weights_only=True"):
        read_official_state_dict(ckpt)
    assert not marker.exists()  # nothing ran
    with pytest.raises(pickle.UnpicklingError):  # and torch itself refuses it the same way
        torch.load(ckpt, weights_only=True)
    assert not marker.exists()

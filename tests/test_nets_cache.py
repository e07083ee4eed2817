"""The decompressed-network cache of OnnxNet (no xz decompression at every start) and the sessions' thread count."""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import pytest

from facerecon.errors import ModelFileError
from facerecon.nets import runtime
from facerecon.nets.runtime import OnnxNet, cache_path
from tests.conftest import ICT_MODEL

CNET = ICT_MODEL.parent / "cnet.json"


def _no_decompress(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object, **__: object) -> bytes:
        raise AssertionError("decompressed although the cache holds the network")

    monkeypatch.setattr(runtime.lzma, "decompress", fail)


def _xz_copy(tmp_path: Path) -> Path:
    """A models folder whose C-Net is stored xz-compressed (the shipped one may be plain or compressed)."""
    folder = tmp_path / "ict"
    folder.mkdir()
    for name in ("facemodel.json", "facemodel.npz", "cnet.json", "rnet.json"):
        shutil.copy(ICT_MODEL.parent / name, folder / name)
    card = json.loads(CNET.read_text())
    packed, plain = ICT_MODEL.parent / (card["file"] + ".xz"), ICT_MODEL.parent / card["file"]
    raw = lzma.decompress(packed.read_bytes()) if packed.is_file() else plain.read_bytes()
    (folder / (card["file"] + ".xz")).write_bytes(lzma.compress(raw, preset=1))
    return folder / "facemodel.npz"


def test_an_xz_network_is_decompressed_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npz = _xz_copy(tmp_path)
    cache = tmp_path / "cache"
    first = OnnxNet.for_face_model(npz, "cnet", cache_dir=cache)
    cached = cache_path(cache, first.card)
    assert cached.name == f"{first.card.sha256}.onnx"
    assert cached.stat().st_size == first.card.bytes
    assert cached.read_bytes() == lzma.decompress((npz.parent / "cnet.onnx.xz").read_bytes())
    assert not list(cached.parent.glob("*.tmp"))  # written atomically
    with monkeypatch.context() as m:
        _no_decompress(m)
        second = OnnxNet.for_face_model(npz, "cnet", cache_dir=cache)
    assert second.card == first.card
    # a corrupt cache entry is not trusted: decompressed again and replaced
    cached.write_bytes(b"\0" * first.card.bytes)
    OnnxNet.for_face_model(npz, "cnet", cache_dir=cache)
    assert cached.read_bytes()[:4] != b"\0\0\0\0"


def test_an_unwritable_cache_falls_back_to_memory(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")  # the cache folder cannot be created below a file
    net = OnnxNet.for_face_model(ICT_MODEL, "cnet", cache_dir=blocked)
    assert net.card.kind == "cnet"
    net_no_cache = OnnxNet.for_face_model(ICT_MODEL, "cnet", cache_dir=None)
    assert net_no_cache.sha256 == net.sha256


def test_a_plain_onnx_beside_its_card_needs_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped networks may be plain ``.onnx`` (a new R-Net is): read as they are, nothing cached."""
    folder = tmp_path / "ict"
    folder.mkdir()
    for name in ("facemodel.json", "facemodel.npz", "cnet.json", "rnet.json"):
        shutil.copy(ICT_MODEL.parent / name, folder / name)
    card = json.loads(CNET.read_text())
    packed = ICT_MODEL.parent / (card["file"] + ".xz")
    plain = ICT_MODEL.parent / card["file"]
    (folder / card["file"]).write_bytes(lzma.decompress(packed.read_bytes()) if packed.is_file()
                                        else plain.read_bytes())
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        _no_decompress(m)
        net = OnnxNet.for_face_model(folder / "facemodel.npz", "cnet", cache_dir=cache)
    assert net.card.kind == "cnet" and not cache.exists()
    (folder / card["file"]).write_bytes(b"not the network")
    with pytest.raises(ModelFileError, match="bytes"):
        OnnxNet.for_face_model(folder / "facemodel.npz", "cnet", cache_dir=cache)


def test_sessions_honour_the_thread_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    net = OnnxNet.for_face_model(ICT_MODEL, "cnet", intra_op_threads=1)
    assert net._session.get_session_options().intra_op_num_threads == 1
    from facerecon.config import Settings, onnx_threads

    assert onnx_threads(Settings(torch_threads=1)) == 1
    assert onnx_threads(Settings(torch_threads=1, onnx_threads=2)) == 2


def test_the_engine_loads_its_networks_with_the_configured_threads(reconstructor) -> None:
    from facerecon.config import onnx_threads

    want = onnx_threads(reconstructor.settings)
    for net in (reconstructor.rnet, reconstructor.cnet):
        if net is not None:
            assert net._session.get_session_options().intra_op_num_threads == want

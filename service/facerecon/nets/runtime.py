"""Run an exported network (:mod:`facerecon.nets.onnx_io`) with onnxruntime.

:class:`OnnxNet` opens a network by its side-car card (``rnet.json`` / ``cnet.json``) and refuses, with a
:class:`~facerecon.errors.ModelFileError` that says what is wrong, anything it cannot vouch for: a missing card or
onnx file, a size or sha256 that differs from the card, a card that disagrees with the copy embedded in the file,
a coefficient layout (or face model name) that is not the served face model's, or a graph whose inputs/outputs
differ from the card. It never falls back to an untrained or random network.

Execution providers: CUDA when onnxruntime offers it (the ``onnxruntime-gpu`` wheel) and ``device`` allows it, else
CPU. :attr:`OnnxNet.providers` reports what the session actually uses (ORT silently drops CUDA when its libraries
fail to load). Threads: ``intra_op_threads`` (0 = onnxruntime's default, one per physical core) and one inter-op
thread; spinning is off by default so idle worker threads do not burn the cores other requests need.

Thread safety: ``InferenceSession.run`` is safe to call concurrently from several threads on one session (the
onnxruntime documentation guarantees it), so one :class:`OnnxNet` can serve every worker thread; concurrent calls
share the intra-op thread pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import lzma
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ValidationError

from facerecon.cachefile import write_atomically
from facerecon.coefficients import CoefficientLayout
from facerecon.errors import ModelFileError
from facerecon.nets.cards import (
    CARD_METADATA_KEY,
    INPUT_SIZE,
    NetworkCard,
    card_summary,
    face_model_layout,
    face_model_ref,
    read_network_card,
)
from facerecon.nets.session import CUDA, make_session, select_providers

__all__ = ["OnnxNet", "check_pair", "select_providers"]

log = logging.getLogger(__name__)

class OnnxNet:
    """An R-Net or C-Net onnx file, verified against its card and served by one onnxruntime session.

    Args:
        card_path: the side-car card (``.../rnet.json``); the onnx file is ``card.file`` beside it.
        kind: when given, the card's kind must be this (``"rnet"`` / ``"cnet"``).
        expected_layout: the served face model's layout; a different card layout is refused.
        face_model_name: the served face model's name; a different card name is refused.
        face_model_sha256: the served face model's sha256; a difference is logged as a warning (same layout and
            name: a rebuild of the same model), or refused when ``strict_face_model``.
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        intra_op_threads: onnxruntime intra-op threads (0 = its default).
        allow_spinning: let idle intra-op threads spin (lower latency for one caller, wasted CPU for many).
        cache_dir: where an xz-compressed network is kept decompressed between starts (None: in memory only).

    Attributes:
        card: the validated :class:`~facerecon.nets.cards.NetworkCard`; path: the onnx file;
        providers: the execution providers in use; input_names / output_names: as in the card.
    """

    def __init__(
        self,
        card_path: Path,
        *,
        kind: Literal["rnet", "cnet"] | None = None,
        expected_layout: CoefficientLayout | None = None,
        face_model_name: str | None = None,
        face_model_sha256: str | None = None,
        strict_face_model: bool = False,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        intra_op_threads: int = 0,
        allow_spinning: bool = False,
        cache_dir: Path | None = None,
    ) -> None:
        card_path = Path(card_path)
        card = read_network_card(card_path)
        path = card_path.parent / str(card.file)
        self.card: NetworkCard = card
        self.path = path
        data = self._read_checked(card, path, cache_dir)
        self._check_compat(card, kind, expected_layout, face_model_name, face_model_sha256, strict_face_model)
        wanted = select_providers(device)
        try:  # from the very bytes that were hashed
            self._session = make_session(
                data, device=device, intra_op_threads=intra_op_threads, allow_spinning=allow_spinning
            )
        except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
            raise ModelFileError(
                f"network {path} cannot be loaded by onnxruntime ({type(exc).__name__}: {exc})"
            ) from exc
        self._check_embedded_card(card, path)
        del data
        self.providers: list[str] = list(self._session.get_providers())
        if CUDA in wanted and CUDA not in self.providers:
            log.warning("onnxruntime could not start CUDA for %s; running on %s", path.name, self.providers)
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        want_in, want_out = [s.name for s in card.inputs], [s.name for s in card.outputs]
        if self.input_names != want_in or self.output_names != want_out:
            raise ModelFileError(
                f"network {path} has inputs {self.input_names} / outputs {self.output_names}, its card says "
                f"{want_in} / {want_out}"
            )
        log.info("loaded %s on %s", card_summary(card), self.providers)

    @classmethod
    def for_face_model(cls, face_model_npz: Path, kind: Literal["rnet", "cnet"] = "rnet", **kwargs: object) -> OnnxNet:
        """The ``<kind>.json`` network beside an installed face model, checked against that model's card."""
        face_model_npz = Path(face_model_npz)
        ref = face_model_ref(face_model_npz)
        return cls(
            face_model_npz.parent / f"{kind}.json",
            kind=kind,
            expected_layout=face_model_layout(face_model_npz),
            face_model_name=ref.name,
            face_model_sha256=ref.sha256,
            **kwargs,  # type: ignore[arg-type]
        )

    @staticmethod
    def _read_checked(card: NetworkCard, path: Path, cache_dir: Path | None = None) -> bytes:
        """The file's bytes, after checking their size and sha256 against the card.

        A network may be stored xz-compressed beside its card (``rnet.onnx.xz``, see :func:`compress_network`);
        the card's size and sha256 apply to the decompressed bytes. Decompressing the R-Net costs ~1 s of CPU, so the
        result is kept in ``cache_dir`` as ``<sha256>.onnx`` (content-addressed: a new network is a new file) and
        read from there on later starts, checked against the card like any network file; a cache entry that fails
        the check is replaced. An unwritable ``cache_dir`` (or ``None``) means decompressing in memory each time.
        A plain ``.onnx`` beside the card is read as it is (no cache).
        """
        packed = path.with_name(path.name + XZ_SUFFIX)
        try:
            if not path.is_file() and packed.is_file():
                cached = _cache_read(cache_dir, card)
                if cached is not None:
                    return cached
                data = lzma.decompress(packed.read_bytes())
                _check_bytes(card, path, data)
                _cache_write(cache_dir, card, data)
                return data
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelFileError(f"network file {path} named by its card is missing") from None
        except lzma.LZMAError as exc:
            raise ModelFileError(f"network file {packed} is not valid xz data ({exc}); re-export it") from exc
        except OSError as exc:
            raise ModelFileError(f"network file {path} is unreadable: {exc}") from exc
        _check_bytes(card, path, data)
        return data

    def _check_embedded_card(self, card: NetworkCard, path: Path) -> None:
        raw = self._session.get_modelmeta().custom_metadata_map.get(CARD_METADATA_KEY)
        if raw is None:
            raise ModelFileError(
                f"network {path} carries no facerecon card in its metadata (not exported by facerecon)"
            )
        try:
            embedded = NetworkCard.model_validate_json(raw)
        except ValidationError as exc:
            raise ModelFileError(f"network {path} has an invalid embedded card: {exc}") from exc
        fields = ("kind", "backbone", "feature_dim", "layout", "face_model", "inputs", "outputs")
        differ = [f for f in fields if getattr(embedded, f) != getattr(card, f)]
        if differ:
            raise ModelFileError(
                f"network {path}: the card embedded in the file disagrees with the side-car on {differ}"
            )

    @staticmethod
    def _check_compat(
        card: NetworkCard,
        kind: str | None,
        layout: CoefficientLayout | None,
        name: str | None,
        sha: str | None,
        strict: bool,
    ) -> None:
        where = f"network {card.file} ({card.kind})"
        if kind is not None and card.kind != kind:
            raise ModelFileError(f"{where} is a {card.kind}, expected a {kind}")
        if layout is not None and card.layout != layout:
            raise ModelFileError(
                f"{where} was trained for coefficient layout {card.layout.model_dump()} (face model "
                f"'{card.face_model.name}'), but the served face model has {layout.model_dump()}"
            )
        if name is not None and card.face_model.name != name:
            raise ModelFileError(f"{where} was trained for face model '{card.face_model.name}', not '{name}'")
        if sha and card.face_model.sha256 and sha != card.face_model.sha256:
            msg = (
                f"{where} was trained against face model '{card.face_model.name}' sha256 "
                f"{card.face_model.sha256[:12]}…, the served one is {sha[:12]}… (same layout: a rebuild?)"
            )
            if strict:
                raise ModelFileError(msg)
            log.warning(msg)

    @property
    def kind(self) -> str:
        return self.card.kind

    @property
    def layout(self) -> CoefficientLayout:
        return self.card.layout

    @property
    def sha256(self) -> str:
        return str(self.card.sha256)

    def run(self, images: np.ndarray, features: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Run one batch.

        Args:
            images: ``(B, 3, 224, 224)`` float32, RGB, pixel / 255 in [0, 1] (see the card's ``image``).
            features: C-Net only, ``(B, feature_dim)`` float32 (the R-Net's ``features`` output).

        Returns:
            Output name -> float32 array: R-Net ``coeffs (B, total)``, ``features (B, C)``; C-Net ``conf_id (B,
            K_id)``, ``conf_tex (B, K_tex)``.
        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE) or images.shape[0] == 0:
            raise ValueError(f"expected images (B, 3, {INPUT_SIZE}, {INPUT_SIZE}), got {images.shape}")
        feeds = {"image": images}
        if self.card.kind == "cnet":
            if features is None:
                raise ValueError("a C-Net needs the R-Net's features")
            features = np.ascontiguousarray(features, dtype=np.float32)
            if features.shape != (images.shape[0], self.card.feature_dim):
                raise ValueError(
                    f"expected features ({images.shape[0]}, {self.card.feature_dim}), got {features.shape}"
                )
            feeds["features"] = features
        elif features is not None:
            raise ValueError("an R-Net takes only images")
        outputs = self._session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs, strict=True))


XZ_SUFFIX = ".xz"


def _check_bytes(card: NetworkCard, path: Path, data: bytes) -> None:
    if len(data) != card.bytes:
        raise ModelFileError(
            f"network {path} has {len(data)} bytes, its card says {card.bytes} (truncated or replaced; re-export it)"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != card.sha256:
        raise ModelFileError(
            f"network {path} does not match its card: sha256 {actual[:12]}… != {str(card.sha256)[:12]}… "
            "(the file is corrupt or was replaced; re-export it)"
        )


def cache_path(cache_dir: Path, card: NetworkCard) -> Path:
    """Where a decompressed network is cached: ``<cache_dir>/networks/<sha256>.onnx``."""
    return Path(cache_dir) / "networks" / f"{card.sha256}.onnx"


def _cache_read(cache_dir: Path | None, card: NetworkCard) -> bytes | None:
    """The cached decompressed network when present and matching the card, else None (a bad entry is removed)."""
    if cache_dir is None:
        return None
    target = cache_path(cache_dir, card)
    try:
        data = target.read_bytes()
    except OSError:
        return None
    if len(data) == card.bytes and hashlib.sha256(data).hexdigest() == card.sha256:
        return data
    log.warning("cached network %s does not match its card; decompressing again", target)
    with contextlib.suppress(OSError):
        target.unlink()
    return None


def _cache_write(cache_dir: Path | None, card: NetworkCard, data: bytes) -> None:
    """Store a verified decompressed network (atomically: a temporary file renamed into place); an unwritable
    cache is logged and skipped."""
    if cache_dir is None:
        return
    target = cache_path(cache_dir, card)
    try:
        write_atomically(target, lambda fh: fh.write(data))
    except OSError as exc:
        log.info("network cache %s not writable (%s): decompressing in memory at every start", target.parent, exc)
        return
    log.info("cached the decompressed %s network as %s", card.kind, target)


def compress_network(path: Path) -> Path:
    """Replace ``path`` (an exported ``.onnx``) by ``path.xz`` (xz preset 9), which :class:`OnnxNet` reads
    transparently. Keeps a shipped network under the repository's 20 MB per-file limit (float16 ResNet-18:
    22.6 -> 20.4 MB); costs about a second of decompression at start-up. Returns the new path."""
    path = Path(path)
    packed = path.with_name(path.name + XZ_SUFFIX)
    packed.write_bytes(lzma.compress(path.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
    path.unlink()
    return packed


def check_pair(rnet: OnnxNet, cnet: OnnxNet) -> None:
    """Refuse a C-Net that does not belong to this R-Net (kind, layout, feature size, paired sha256)."""
    if rnet.kind != "rnet" or cnet.kind != "cnet":
        raise ModelFileError(f"expected an rnet and a cnet, got {rnet.kind} and {cnet.kind}")
    if cnet.layout != rnet.layout or cnet.card.feature_dim != rnet.card.feature_dim:
        raise ModelFileError(
            f"C-Net {cnet.path} (layout {cnet.layout.sizes()}, features {cnet.card.feature_dim}) does not fit R-Net "
            f"{rnet.path} (layout {rnet.layout.sizes()}, features {rnet.card.feature_dim})"
        )
    paired = cnet.card.paired_rnet_sha256
    if paired and paired != rnet.sha256:
        raise ModelFileError(
            f"C-Net {cnet.path} was trained on the features of R-Net sha256 {paired[:12]}…, not {rnet.sha256[:12]}…"
        )

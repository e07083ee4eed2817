"""Reader for dlib's binary serialisation of DNN models (``*.dat`` written by ``dlib::serialize(net)``).

Written from the format's description, not from dlib's code. What the reader relies on:

* **Integers** are variable-length: one control byte (low nibble = number of payload bytes, 0-8; bit 7 = the
  value is negative; bits 4-6 must be zero) followed by that many little-endian magnitude bytes.
* **Floats** (scalars) are dlib's *portable* encoding: an integer mantissa then an integer exponent, both as
  the variable-length integers above; the value is ``mantissa * 2**exponent``. Exponents 32000/32001 stand for
  +inf/-inf and 32002/32003 for NaN.
* **bool** is one ASCII byte, ``'1'`` or ``'0'``. **Strings** are a length (integer) then the raw bytes.
* **Tensors** start with a version integer and the four dimensions (num_samples, k, nr, nc). Version 1 stores
  every element as a portable float; version 2 stores them as raw little-endian IEEE float32.
* **Alias tensors** (views into a layer's parameter tensor) store a version (1) and four dimensions only.
* **A network** is nested ``add_layer`` objects. A loss layer writes its version, its own record and then its
  sub-network; every ``add_layer`` (and every ``tag``/``skip`` wrapper, which holds no parameters) writes its
  version before its sub-network, so the file holds all nesting versions outer-to-inner first, then the input
  layer, then - from the input side outwards - each computational layer's record followed by the
  ``add_layer`` bookkeeping (three bools and three tensors that are empty in a cleaned network).

Tags and skips leave no record of their own except a version (1) in the version run; their ids are template
parameters, not data, so the *graph* of a residual network cannot be recovered from the file alone. The reader
therefore returns the layers in order plus how many tag/skip wrappers sit between consecutive layers, and a
consumer that knows the architecture checks the stream against it.

Security: no code is executed and no object is unpickled; every length is bounded by the bytes that remain.

Size: over 400 lines: a reader for dlib's whole serialisation format (tags, portable floats, every layer type the
descriptor uses), training-only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facerecon.errors import ModelFileError

__all__ = [
    "AddPrev",
    "Affine",
    "Con",
    "DlibFormatError",
    "DlibNetwork",
    "DlibReader",
    "Fc",
    "InputRGBImageSized",
    "Layer",
    "LossMetric",
    "Pool",
    "Relu",
    "read_network",
    "read_network_file",
]

log = logging.getLogger(__name__)

# Special exponents of dlib's portable float encoding.
_EXP_INF, _EXP_NINF, _EXP_QNAN, _EXP_SNAN = 32000, 32001, 32002, 32003
# Versions written by the add_layer family: 1 = tag/skip wrapper (or loss), 2 = add_layer, 3 = add_layer whose
# sub-network is the input layer. Anything else is a format we do not know.
_WRAPPER_VERSION = 1
_LAYER_VERSIONS = (2, 3)


class DlibFormatError(ModelFileError):
    """A dlib ``.dat`` stream that is truncated, malformed or uses a layer/version this reader does not know."""

    code = "dlib_format"


# ---------------------------------------------------------------------------------------------------------------
# Primitive reader
# ---------------------------------------------------------------------------------------------------------------


class DlibReader:
    """Cursor over a dlib serialisation byte stream. Every ``read_*`` advances the cursor and raises
    :class:`DlibFormatError` (with the byte offset and what was being read) on malformed input."""

    def __init__(self, data: bytes | bytearray | memoryview, *, source: str = "<bytes>") -> None:
        self._buf = memoryview(bytes(data)) if not isinstance(data, bytes) else memoryview(data)
        self.pos = 0
        self.source = source

    # -- helpers -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._buf)

    @property
    def remaining(self) -> int:
        return len(self._buf) - self.pos

    def at_end(self) -> bool:
        return self.pos >= len(self._buf)

    def error(self, what: str, msg: str, *, at: int | None = None) -> DlibFormatError:
        where = self.pos if at is None else at
        return DlibFormatError(
            f"{self.source}: byte {where}: {msg} (while reading {what})", source=self.source, offset=where
        )

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise self.error(what, f"needs {n} bytes but only {self.remaining} remain (truncated file?)")
        out = self._buf[self.pos : self.pos + n]
        self.pos += n
        return out

    # -- scalars -------------------------------------------------------------------------------------------------
    def read_int(self, what: str = "integer", *, max_bytes: int = 8, signed: bool = True) -> int:
        """A dlib variable-length integer (``serialize(int/long/size_t)``)."""
        start = self.pos
        ctrl = self._take(1, what)[0]
        size, negative = ctrl & 0x0F, bool(ctrl & 0x80)
        if ctrl & 0x70:
            raise self.error(what, f"bad integer control byte 0x{ctrl:02x} (reserved bits set)", at=start)
        if size > max_bytes:
            raise self.error(what, f"integer of {size} bytes is wider than the {max_bytes} allowed", at=start)
        if negative and not signed:
            raise self.error(what, "negative value for an unsigned integer", at=start)
        value = int.from_bytes(self._take(size, what), "little", signed=False)
        return -value if negative else value

    def read_uint(self, what: str = "unsigned integer", *, max_bytes: int = 8) -> int:
        return self.read_int(what, max_bytes=max_bytes, signed=False)

    def read_float(self, what: str = "float") -> float:
        """A scalar in dlib's portable float encoding (int64 mantissa, int16 exponent)."""
        start = self.pos
        mantissa = self.read_int(f"{what} (mantissa)", max_bytes=8)
        exponent = self.read_int(f"{what} (exponent)", max_bytes=2)
        if exponent == _EXP_INF:
            return math.inf
        if exponent == _EXP_NINF:
            return -math.inf
        if exponent in (_EXP_QNAN, _EXP_SNAN):
            return math.nan
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError as exc:
            raise self.error(what, f"float {mantissa}*2^{exponent} overflows", at=start) from exc

    def read_bool(self, what: str = "bool") -> bool:
        start = self.pos
        ch = self._take(1, what)[0]
        if ch == ord("1"):
            return True
        if ch == ord("0"):
            return False
        raise self.error(what, f"bool byte must be '0' or '1', got 0x{ch:02x}", at=start)

    def read_string(self, what: str = "string", *, max_len: int = 1 << 16) -> str:
        start = self.pos
        n = self.read_uint(f"{what} (length)")
        if n > max_len:
            raise self.error(what, f"string length {n} exceeds the {max_len} allowed", at=start)
        raw = bytes(self._take(n, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise self.error(what, "string is not ASCII", at=start) from exc

    def peek_string(self, *, max_len: int = 64) -> str | None:
        """The string at the cursor if one that looks like a layer tag (ASCII identifier, 3..max_len chars)
        starts there, else ``None``. Does not move the cursor."""
        save = self.pos
        try:
            n = self.read_uint("peek")
            if not 3 <= n <= max_len or n > self.remaining:
                return None
            raw = bytes(self._buf[self.pos : self.pos + n])
            text = raw.decode("ascii")
            return text if text.replace("_", "a").isalnum() and text[0].isalpha() else None
        except (DlibFormatError, UnicodeDecodeError):
            return None
        finally:
            self.pos = save

    # -- tensors -------------------------------------------------------------------------------------------------
    def _read_dims(self, what: str) -> tuple[int, int, int, int]:
        dims = tuple(self.read_int(f"{what} (dim {i})") for i in range(4))
        if any(d < 0 for d in dims):
            raise self.error(what, f"negative tensor dimension {dims}")
        return dims  # type: ignore[return-value]

    def read_tensor(self, what: str = "tensor") -> np.ndarray:
        """A ``resizable_tensor``: returns float32 of shape (num_samples, k, nr, nc)."""
        start = self.pos
        version = self.read_int(f"{what} (version)")
        dims = self._read_dims(what)
        count = math.prod(dims)
        if version == 2:
            if count * 4 > self.remaining:
                raise self.error(what, f"tensor {dims} needs {count * 4} bytes, {self.remaining} remain", at=start)
            data = np.frombuffer(self._take(count * 4, what), dtype="<f4").astype(np.float32)
        elif version == 1:
            if count * 2 > self.remaining:  # a portable float takes at least 2 bytes
                raise self.error(what, f"tensor {dims} cannot fit in the {self.remaining} bytes left", at=start)
            data = np.array([self.read_float(f"{what} element") for _ in range(count)], dtype=np.float32)
        else:
            raise self.error(what, f"unknown tensor version {version} (known: 1, 2)", at=start)
        return data.reshape(dims)

    def read_alias_tensor(self, what: str = "alias tensor") -> tuple[int, int, int, int]:
        """An ``alias_tensor`` (a shaped view into a parameter tensor): returns its (n, k, nr, nc)."""
        start = self.pos
        version = self.read_int(f"{what} (version)")
        if version != 1:
            raise self.error(what, f"unknown alias_tensor version {version} (known: 1)", at=start)
        return self._read_dims(what)


# ---------------------------------------------------------------------------------------------------------------
# Layer records
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossMetric:
    """``loss_metric_``: metric-learning loss; only meaningful for training (margin, distance threshold)."""

    margin: float
    distance_threshold: float


@dataclass(frozen=True)
class InputRGBImageSized:
    """``input_rgb_image_sized``: RGB image of fixed size; tensor = (pixel - mean_rgb) / 256, channels R, G, B."""

    mean_rgb: tuple[float, float, float]
    rows: int
    cols: int


@dataclass(frozen=True, eq=False)
class Con:
    """``con_``: 2-D cross-correlation. ``weight`` float32 (F, C, kh, kw) (= torch's Conv2d layout), ``bias``
    float32 (F,) or None. Padding is symmetric (the same on both sides)."""

    weight: np.ndarray
    bias: np.ndarray | None
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True, eq=False)
class Affine:
    """``affine_``: y = gamma * x + beta (batch norm folded). Conv mode (mode 0): gamma/beta float32 (K,) per
    channel; fc mode (mode 1): float32 (K*nr*nc,) per element."""

    gamma: np.ndarray
    beta: np.ndarray
    mode: int


@dataclass(frozen=True, eq=False)
class Fc:
    """``fc_``: y = x_flat @ weight + bias with ``weight`` float32 (num_inputs, num_outputs) and ``bias`` float32
    (num_outputs,) or None; ``x_flat`` is the input flattened per sample in (k, nr, nc) order."""

    weight: np.ndarray
    bias: np.ndarray | None


@dataclass(frozen=True)
class Pool:
    """``max_pool_`` / ``avg_pool_``: window (nr, nc), stride, symmetric padding. A window of (0, 0) means
    "the whole input" (avg_pool_everything / max_pool_everything)."""

    kind: str  # "max" or "avg"
    window: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class Relu:
    """``relu_``."""


@dataclass(frozen=True)
class AddPrev:
    """``add_prev_``: output = this sub-network's output + the output of the tagged layer; tensors of
    different shapes are zero-padded (bottom/right, extra channels) to the larger shape before adding."""


Layer = Con | Affine | Fc | Pool | Relu | AddPrev


@dataclass
class DlibNetwork:
    """A parsed network: the loss and input layers, the computational layers from the input side outwards,
    and ``wrappers_before[i]`` = number of tag/skip wrappers between ``layers[i-1]`` (or the input) and
    ``layers[i]``; ``wrappers_after`` the ones between the last layer and the loss."""

    loss: LossMetric
    input: InputRGBImageSized
    layers: list[Layer] = field(default_factory=list)
    wrappers_before: list[int] = field(default_factory=list)
    wrappers_after: int = 0

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for layer in self.layers:
            name = type(layer).__name__ if not isinstance(layer, Pool) else f"{layer.kind}_pool"
            counts[name] = counts.get(name, 0) + 1
        return ", ".join(f"{k}: {v}" for k, v in counts.items())


# ---------------------------------------------------------------------------------------------------------------
# Per-tag payload parsers
# ---------------------------------------------------------------------------------------------------------------


def _read_lr_multipliers(r: DlibReader, tag: str, n: int = 4) -> None:
    for i in range(n):
        r.read_float(f"{tag} learning-rate/weight-decay multiplier {i}")


def _split_params(
    r: DlibReader, tag: str, params: np.ndarray, shapes: list[tuple[int, int, int, int]], at: int
) -> list[np.ndarray]:
    flat = params.reshape(-1)
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != flat.size:
        raise r.error(tag, f"parameter tensor holds {flat.size} values but its views need {sum(sizes)}", at=at)
    out, off = [], 0
    for s, n in zip(shapes, sizes, strict=True):
        out.append(flat[off : off + n].reshape(s).copy())
        off += n
    return out


def _parse_loss_metric(r: DlibReader, tag: str) -> LossMetric:
    margin = r.read_float(f"{tag} margin")
    thresh = r.read_float(f"{tag} distance threshold")
    return LossMetric(margin, thresh)


def _parse_input_rgb_sized(r: DlibReader, tag: str) -> InputRGBImageSized:
    mean = (r.read_float(f"{tag} mean red"), r.read_float(f"{tag} mean green"), r.read_float(f"{tag} mean blue"))
    rows = r.read_int(f"{tag} rows")
    cols = r.read_int(f"{tag} cols")
    if rows <= 0 or cols <= 0:
        raise r.error(tag, f"bad input size {rows}x{cols}")
    return InputRGBImageSized(mean, rows, cols)


def _parse_con(r: DlibReader, tag: str) -> Con:
    at = r.pos
    params = r.read_tensor(f"{tag} params")
    num_filters = r.read_int(f"{tag} num_filters")
    nr, nc = r.read_int(f"{tag} nr"), r.read_int(f"{tag} nc")
    sy, sx = r.read_int(f"{tag} stride_y"), r.read_int(f"{tag} stride_x")
    py, px = r.read_int(f"{tag} padding_y"), r.read_int(f"{tag} padding_x")
    filt = r.read_alias_tensor(f"{tag} filters")
    bias = r.read_alias_tensor(f"{tag} biases")
    _read_lr_multipliers(r, tag)
    use_bias = r.read_bool(f"{tag} use_bias") if tag == "con_5" else True
    if filt[0] != num_filters or filt[2:] != (nr, nc) or min(sy, sx) <= 0 or min(py, px) < 0:
        raise r.error(
            tag,
            f"inconsistent conv header: filters {filt}, num_filters {num_filters}, "
            f"kernel {nr}x{nc}, stride {sy},{sx}, padding {py},{px}",
            at=at,
        )
    if math.prod(bias) not in (0, num_filters):
        raise r.error(tag, f"bias view {bias} does not hold one value per filter ({num_filters})", at=at)
    has_bias = use_bias and math.prod(bias) > 0
    shapes = [filt, bias] if math.prod(bias) > 0 else [filt]
    parts = _split_params(r, tag, params, shapes, at)
    return Con(
        weight=parts[0].astype(np.float32),
        bias=parts[1].reshape(-1).astype(np.float32) if has_bias else None,
        stride=(sy, sx),
        padding=(py, px),
    )


def _parse_affine(r: DlibReader, tag: str) -> Affine:
    at = r.pos
    params = r.read_tensor(f"{tag} params")
    g = r.read_alias_tensor(f"{tag} gamma")
    b = r.read_alias_tensor(f"{tag} beta")
    mode = r.read_int(f"{tag} mode")
    if g != b or mode not in (0, 1):
        raise r.error(tag, f"inconsistent affine header: gamma {g}, beta {b}, mode {mode}", at=at)
    gamma, beta = _split_params(r, tag, params, [g, b], at)
    return Affine(gamma.reshape(-1), beta.reshape(-1), mode)


def _parse_fc(r: DlibReader, tag: str) -> Fc:
    at = r.pos
    num_outputs = r.read_int(f"{tag} num_outputs")
    num_inputs = r.read_int(f"{tag} num_inputs")
    params = r.read_tensor(f"{tag} params")
    w = r.read_alias_tensor(f"{tag} weights")
    b = r.read_alias_tensor(f"{tag} biases")
    bias_mode = r.read_int(f"{tag} bias_mode")
    _read_lr_multipliers(r, tag)
    if w != (num_inputs, num_outputs, 1, 1) or bias_mode not in (0, 1):
        raise r.error(
            tag,
            f"inconsistent fc header: weights {w}, in {num_inputs}, out {num_outputs}, bias_mode {bias_mode}",
            at=at,
        )
    if math.prod(b) not in (0, num_outputs):
        raise r.error(tag, f"bias view {b} does not hold one value per output ({num_outputs})", at=at)
    has_bias = bias_mode == 0 and math.prod(b) > 0
    parts = _split_params(r, tag, params, [w, b] if math.prod(b) > 0 else [w], at)
    weight = parts[0].reshape(num_inputs, num_outputs).astype(np.float32)
    return Fc(weight, parts[1].reshape(-1).astype(np.float32) if has_bias else None)


def _pool_parser(kind: str) -> Callable[[DlibReader, str], Pool]:
    def parse(r: DlibReader, tag: str) -> Pool:
        at = r.pos
        nr, nc = r.read_int(f"{tag} nr"), r.read_int(f"{tag} nc")
        sy, sx = r.read_int(f"{tag} stride_y"), r.read_int(f"{tag} stride_x")
        py, px = r.read_int(f"{tag} padding_y"), r.read_int(f"{tag} padding_x")
        if min(nr, nc, py, px) < 0 or min(sy, sx) <= 0:
            raise r.error(tag, f"bad pooling header {nr}x{nc} stride {sy},{sx} padding {py},{px}", at=at)
        return Pool(kind, (nr, nc), (sy, sx), (py, px))

    return parse


_LOSS_PARSERS: dict[str, Callable[[DlibReader, str], LossMetric]] = {"loss_metric_2": _parse_loss_metric}
_INPUT_PARSERS: dict[str, Callable[[DlibReader, str], InputRGBImageSized]] = {
    "input_rgb_image_sized": _parse_input_rgb_sized
}
_LAYER_PARSERS: dict[str, Callable[[DlibReader, str], Layer]] = {
    "con_4": _parse_con,
    "con_5": _parse_con,
    "affine_": _parse_affine,
    "fc_2": _parse_fc,
    "relu_": lambda r, tag: Relu(),
    "add_prev_": lambda r, tag: AddPrev(),
    "max_pool_2": _pool_parser("max"),
    "avg_pool_2": _pool_parser("avg"),
}


def _read_tag(r: DlibReader, known: dict[str, object], role: str) -> str:
    start = r.pos
    tag = r.read_string(f"{role} tag", max_len=256)
    if tag not in known:
        raise r.error(f"{role} tag", f"unsupported {role} {tag!r}; this reader knows {sorted(known)}", at=start)
    return tag


def _read_add_layer_trailer(r: DlibReader, tag: str, version: int) -> None:
    """The add_layer bookkeeping after a layer's record: 3 bools + 3 tensors (gradients/caches; empty in a
    cleaned net, read and discarded otherwise); the input-side add_layer (version 3) adds the input's
    sample-expansion factor (an integer)."""
    for name in ("setup_called", "gradient_input_is_stale", "get_output_and_gradient_input_disabled"):
        r.read_bool(f"add_layer<{tag}> {name}")
    for name in ("x_grad", "cached_output", "params_grad"):
        r.read_tensor(f"add_layer<{tag}> {name}")
    if version == 3:
        at = r.pos
        factor = r.read_int(f"add_layer<{tag}> sample_expansion_factor")
        if factor < 1:
            raise r.error(f"add_layer<{tag}>", f"bad sample expansion factor {factor}", at=at)


# ---------------------------------------------------------------------------------------------------------------
# Network stream
# ---------------------------------------------------------------------------------------------------------------


def read_network(data: bytes, *, source: str = "<bytes>", max_depth: int = 100_000) -> DlibNetwork:
    """Parse a whole ``loss<...<input>>`` network written by ``dlib::serialize(net)``.

    Supported: loss ``loss_metric_2``; input ``input_rgb_image_sized``; layers ``con_4/5``, ``affine_``,
    ``fc_2``, ``relu_``, ``add_prev_``, ``max_pool_2``, ``avg_pool_2`` and tag/skip wrappers. Raises
    :class:`DlibFormatError` on anything else or on malformed/truncated bytes; trailing bytes are an error too.
    """
    r = DlibReader(data, source=source)
    start = r.pos
    loss_version = r.read_int("loss layer version")
    if loss_version != 1:
        raise r.error("loss layer version", f"unknown add_loss_layer version {loss_version} (known: 1)", at=start)
    tag = _read_tag(r, _LOSS_PARSERS, "loss layer")
    loss = _LOSS_PARSERS[tag](r, tag)

    # Nesting versions, outermost first, up to the input layer.
    versions: list[int] = []
    while True:
        peek = r.peek_string()
        if peek is not None and peek in _INPUT_PARSERS:
            break
        if peek is not None and (peek in _LAYER_PARSERS or peek in _LOSS_PARSERS):
            raise r.error("network nesting", f"found layer {peek!r} before any input layer")
        at = r.pos
        v = r.read_int("add_layer/tag/skip version")
        if v != _WRAPPER_VERSION and v not in _LAYER_VERSIONS:
            raise r.error("network nesting", f"unknown add_layer/tag/skip version {v} (known: 1, 2, 3)", at=at)
        versions.append(v)
        if len(versions) > max_depth:
            raise r.error("network nesting", f"more than {max_depth} nested layers")
    tag = _read_tag(r, _INPUT_PARSERS, "input layer")
    inp = _INPUT_PARSERS[tag](r, tag)

    if not versions or versions[-1] != 3 or versions.count(3) != 1:
        raise r.error("network nesting", "expected exactly one input-side add_layer (version 3), innermost")

    # Inner to outer: each add_layer version is followed (in file order) by one layer record.
    net = DlibNetwork(loss=loss, input=inp)
    wrappers = 0
    for v in reversed(versions):
        if v == _WRAPPER_VERSION:
            wrappers += 1
            continue
        tag = _read_tag(r, _LAYER_PARSERS, "layer")
        net.layers.append(_LAYER_PARSERS[tag](r, tag))
        net.wrappers_before.append(wrappers)
        wrappers = 0
        _read_add_layer_trailer(r, tag, v)
    net.wrappers_after = wrappers
    if not r.at_end():
        raise r.error("end of network", f"{r.remaining} unexpected trailing bytes")
    log.debug("parsed dlib network from %s: %s", source, net.summary())
    return net


def read_network_file(path: str | Path) -> DlibNetwork:
    """Read and parse a dlib network ``.dat`` file (see :func:`read_network`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DlibFormatError(f"cannot read dlib model file {p}: {exc}", source=str(p)) from exc
    return read_network(data, source=str(p))
